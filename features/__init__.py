"""Observation schema and vocabulary, readers, cleaning, windows, NEWS2 and labels.

This package imports nothing else of ours: every later step builds on it.
"""
