"""``tunelab data synth``: question-answer training data made from a folder of documents by a generator model."""
