"""Raw files in, canonical observations out: readers per format, the canonical observation
path (units, ranges, codes) that serving also calls, pseudonyms, consent, and the quarantine.

Imports ``core`` and ``governance`` only.
"""
