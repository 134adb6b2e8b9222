"""The tuning-method contract and its registry.

A method is one object with an options class (pydantic) and four verbs: ``apply`` (make the model
trainable the method's way), ``save`` / ``load`` (its artifact) and ``merge`` (fold it into the base
weights, where that is possible). Each method is declared by name in :data:`METHODS` (a
:class:`tunelab.registry.Registry`) with :func:`declare_method`: the module that implements it, its options
class and its default learning rate, which is what loading a config reads; the implementation module is
imported on the first :func:`get_method` of that name, where its class registers with :func:`register_method`
(which gives the class the declared options class and rate, so each is written once). No central if/elif
anywhere else. Optional capabilities are declared as attributes with defaults
(``tunelab.methods.common.MethodDefaults``), never probed with ``getattr``. ``tunelab.methods.common`` has the
defaults and the peft-backed base class.

Imports no torch (only under ``TYPE_CHECKING``): ``tunelab.resolve`` imports this module to load a config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import BaseModel

from tunelab.registry import Registry

if TYPE_CHECKING:
    from torch import nn


@runtime_checkable
class TuningMethod(Protocol):
    """What every tuning method provides."""

    name: str
    options_class: type[BaseModel]  # declared with declare_method, set on the class by register_method
    artifact: str  # name of the run-dir folder holding the result: "adapter" or "model"
    mergeable: bool  # merge() folds the update into the base weights (same outputs, no extra modules)
    detachable: bool  # disabled() gives back the base model's function (False where base weights change)
    # Run features the method cannot be combined with, checked before training starts; any of
    # "packing" (several examples per row) and "gradient_checkpointing".
    incompatible: frozenset[str]
    # train.lr when the config leaves it out: methods with few parameters need larger steps (declared, as options_class)
    default_lr: float
    # The input embedding itself trains, so tokens a chat-template fallback adds are trained (full fine-tuning);
    # methods with a ``trainable_token_indices`` option train just those rows instead.
    trains_embeddings: bool
    # Positions are put in front of every sequence (prompt and prefix tuning): the logits at a position are not
    # the decoder's own, and ``data.replay.kl`` is refused.
    changes_inputs: bool
    # ``footprint(options, shape) -> tunelab.methods.footprint.Footprint``: what the method trains and adds in
    # ``tunelab plan``'s terms (``tunelab.methods.footprint.Plannable``); None where it does not say, and the
    # planner then refuses it rather than guess.
    footprint: Callable[[BaseModel, Any], Any] | None

    def base_load_kwargs(self, options: BaseModel) -> dict:
        """Extra ``from_pretrained`` arguments for loading the base model (quantisation for QLoRA), else {}."""
        ...

    def check_model(self, options: BaseModel, model_config: Any) -> None:
        """Refuse (TunelabError, saying why) a model the method cannot work on, from its config alone."""
        ...

    def apply(self, model: nn.Module, options: BaseModel) -> nn.Module:
        """Return the model prepared for training; only the method's parameters require grad."""
        ...

    def save(self, model: nn.Module, directory: Path) -> None:
        """Write the trained artifact (safetensors) to ``directory``."""
        ...

    def load(self, base_model: nn.Module, directory: Path, trainable: bool = False) -> nn.Module:
        """Attach a saved artifact to a freshly loaded base model; with ``trainable`` its parameters train on
        (``init_from``), exactly those ``apply`` would have made trainable."""
        ...

    def merge(self, model: nn.Module) -> nn.Module:
        """Return a plain model with the method's update folded into the weights.

        Raises TunelabError where the method cannot be merged (``mergeable`` is False).
        """
        ...

    def disabled(self, model: nn.Module) -> AbstractContextManager:
        """Context in which ``model`` computes exactly what the base model did (``detachable`` methods)."""
        ...

    def starts_at_base(self, options: BaseModel) -> bool:
        """Whether the freshly applied method computes what the base does, and ``disabled`` gives that back
        unchanged: then the untrained base can serve as a reference model without a second copy."""
        ...


# The package's ``__init__`` declares every method; their modules are imported on first lookup.
METHODS: Registry[TuningMethod] = Registry("method")


def declare_method(name: str, module: str, options_class: type[BaseModel], *, default_lr: float) -> None:
    """Declare the method ``name``: ``module`` implements (and registers) it; ``options_class`` validates its
    config section and ``default_lr`` is ``train.lr`` where the config leaves it out, both read without
    importing ``module``."""
    METHODS.declare(name, module, options_class=options_class, default_lr=default_lr)


def register_method(method_class: type) -> type:
    """Class decorator: instantiate the method and register it under its ``name``.

    A declared method's class gets the declared ``options_class`` and ``default_lr``; an undeclared one (a
    plugin's) keeps its own and registers them as capabilities, so ``tunelab.resolve`` reads either alike.
    """
    if method_class.name in METHODS:
        declared = METHODS.capabilities(method_class.name)
        method_class.options_class, method_class.default_lr = declared["options_class"], declared["default_lr"]
    instance = method_class()
    METHODS.register(instance.name, instance, options_class=instance.options_class, default_lr=instance.default_lr)
    return method_class


def get_method(name: str) -> TuningMethod:
    """The registered method called ``name``; KeyError (naming the close matches) if there is none."""
    return METHODS.get(name)


def method_names() -> list[str]:
    return METHODS.names()


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters that require grad, by name; what checkpoints save and the optimizer updates."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _logical_numel(p) -> int:
    """Weights a parameter stands for: a 4-bit quantized tensor packs two weights per stored byte."""
    quant_state = getattr(p, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    return math.prod(int(n) for n in shape) if shape is not None else p.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = _logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


# Files that identify an artifact's method when it is given without its run directory.
_ARTIFACT_MARKERS = {"tunelab_adapter.json": "adapter", "tunelab_freeze.json": "freeze"}


def artifact_method(directory: Path) -> TuningMethod | None:
    """The method that can load the artifact in ``directory``: a PEFT adapter, or one of tunelab's own."""
    import json

    for marker, name in _ARTIFACT_MARKERS.items():
        if (directory / marker).is_file():
            return get_method(name)
    peft_config = directory / "adapter_config.json"
    if peft_config.is_file():
        peft_type = str(json.loads(peft_config.read_text()).get("peft_type", "LORA")).lower()
        return get_method({"prefix_tuning": "prefix", "prompt_tuning": "prompt"}.get(peft_type, peft_type))
    return None
