"""Evaluation: generation with the training chat template, and metrics."""
