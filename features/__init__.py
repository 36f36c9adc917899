"""Point-in-time features and labels: windows, baselines, NEWS2, labels, the stage and its
backends. Imports ``core`` only.
"""
