"""The tuning-method contract and its registry.

A method is one object with an options class (pydantic) and four verbs: ``apply`` (make the model
trainable the method's way), ``save`` / ``load`` (its artifact) and ``merge`` (fold it into the base
weights, where that is possible). Methods register themselves by name with :func:`register_method`;
adding a method means adding a module to this package and importing it in ``__init__``; no central
if/elif anywhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from pydantic import BaseModel
from torch import nn


@runtime_checkable
class TuningMethod(Protocol):
    """What every tuning method provides."""

    name: str
    options_class: type[BaseModel]
    artifact: str  # name of the run-dir folder holding the result: "adapter" or "model"

    def apply(self, model: nn.Module, options: BaseModel) -> nn.Module:
        """Return the model prepared for training; only the method's parameters require grad."""
        ...

    def save(self, model: nn.Module, directory: Path) -> None:
        """Write the trained artifact (safetensors) to ``directory``."""
        ...

    def load(self, base_model: nn.Module, directory: Path) -> nn.Module:
        """Attach a saved artifact to a freshly loaded base model."""
        ...

    def merge(self, model: nn.Module) -> nn.Module:
        """Return a plain model with the method's update folded into the weights."""
        ...


_REGISTRY: dict[str, TuningMethod] = {}


def register_method(method_class: type) -> type:
    """Class decorator: instantiate the method and register it under its ``name``."""
    instance = method_class()
    if instance.name in _REGISTRY:
        raise ValueError(f"tuning method {instance.name!r} is registered twice")
    _REGISTRY[instance.name] = instance
    return method_class


def get_method(name: str) -> TuningMethod:
    """The registered method called ``name``; KeyError if there is none."""
    return _REGISTRY[name]


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def trainable_parameters(model: nn.Module) -> dict[str, "nn.Parameter"]:
    """Parameters that require grad, by name; what checkpoints save and the optimizer updates."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
