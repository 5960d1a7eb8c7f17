"""Runtime backends: load an artifact, stream tokens, score log-probabilities.

``serve``, ``eval`` and ``generate`` all go through this layer.
"""
