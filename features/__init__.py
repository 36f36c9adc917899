"""Point-in-time features and labels: one module per feature family (``features/families``),
one plan, two executors, windows, NEWS2, labels, the stage and its backends. Imports ``core``
only.
"""
