"""``tunelab data generate`` and ``tunelab data preferences``: training data made by a model."""
