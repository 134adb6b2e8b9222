"""Tuning methods behind one registry. Importing a method's module registers it."""

from tunelab.methods import adapter, freeze, full, ia3, lora, prompt_tuning, qlora  # noqa: F401  (registration side effect)
from tunelab.methods.base import (
    METHODS,
    TuningMethod,
    artifact_method,
    count_parameters,
    get_method,
    method_names,
    register_method,
    trainable_parameters,
)

__all__ = [
    "METHODS",
    "TuningMethod",
    "artifact_method",
    "count_parameters",
    "get_method",
    "method_names",
    "register_method",
    "trainable_parameters",
]
