"""Stages: the translation from a run configuration to the components' plain arguments.

Recipes, ``tunelab compare``, ``tunelab plan`` and the CLI read a ``RunConfig``; the components in
``training/``, ``data/``, ``evaluation/``, ``generation/``, ``models/`` and ``methods/`` never see one.
The functions here sit between the two: read and tokenize the configured data, load the configured
model, evaluate before and after training. They never import ``recipes/``, ``compare/`` or ``cli``.
"""
