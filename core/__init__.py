"""What every step shares: the observation schema, the vocabulary, typed params, user errors
and the contracts between steps (such as the prediction-log schema).

This package imports nothing else of ours.
"""
