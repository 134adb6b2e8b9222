"""Tuning methods behind one registry. Importing a method's module registers it."""

from tunelab.methods import full, lora  # noqa: F401  (registration side effect)
from tunelab.methods.base import (
    TuningMethod,
    count_parameters,
    get_method,
    method_names,
    register_method,
    trainable_parameters,
)

__all__ = [
    "TuningMethod",
    "count_parameters",
    "get_method",
    "method_names",
    "register_method",
    "trainable_parameters",
]
