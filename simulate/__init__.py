"""Synthetic cohorts and their drift variants; writes raw files only. Imports ``core`` only."""
