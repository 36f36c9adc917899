"""Governance primitives shared by every step: pseudonymisation, consent, audit chain, lineage.

Like ``features``, this package imports nothing else of ours, so ingestion, training, serving
and the CLI can all use it.
"""
