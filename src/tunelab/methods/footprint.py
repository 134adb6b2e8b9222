"""What a tuning method trains and adds, in the terms of ``tunelab plan``'s memory and time model.

Each registered method describes itself through ``footprint(options, shape)``, so the planner holds no
per-method knowledge: a new method is planned once it provides the hook, and refused with a clear
message while it does not. This module sits in ``tunelab.methods`` rather than ``tunelab.planning`` so
that method modules can build their description without importing the planner.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from pydantic import BaseModel


class ShapeLike(Protocol):
    """The model sizes a footprint may depend on (``tunelab.planning.shape.ModelShape`` provides them)."""

    model_type: str
    hidden: int
    layers: int
    kv_heads: int
    head_dim: int

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """A decoder block's linear layers: short name (``q_proj``) -> (d_in, d_out, has bias)."""
        ...

    def parameter_table(self) -> dict[str, int]:
        """Base parameter name, as transformers names it -> element count."""
        ...


@dataclass
class Footprint:
    """What a method trains, adds and changes in the forward pass, as the planner models it."""

    frozen_base: bool  # no base weight trains (a 16-bit base then saves memory without touching trained weights)
    trainable: set[str] = field(default_factory=set)  # trained base parameters, by name
    extra: int = 0  # parameters the method adds (all trained)
    extra_in_weight_dtype: bool = False  # added parameters take the base weight dtype (else float32, as peft's)
    lora: dict[str, int] = field(default_factory=dict)  # target linear -> r
    dropout: float = 0.0  # on the LoRA input
    ia3_out: set[str] = field(default_factory=set)  # linears whose output is scaled
    ia3_in: set[str] = field(default_factory=set)  # linears whose input is scaled
    adapters: dict[str, int] = field(default_factory=dict)  # linear followed by an adapter -> bottleneck
    virtual_tokens: int = 0  # prompt tuning: positions added in front of every row
    prefix: int = 0  # prefix tuning: trained key/value positions per block
    quant_bits: int = 0  # the base is quantised to this many bits (0: not quantised)
    double_quant: bool = True
    full_logits: bool = False  # every position is projected onto the vocabulary (no trained-position shortcut)
    input_grad: bool = False  # the embedding output requires grad
    # (method name, what it saves): a method taking the same options that the planner suggests when the
    # run does not fit, e.g. LoRA -> ("qlora", "4-bit base")
    cheaper_variant: tuple[str, str] | None = None


@runtime_checkable
class Plannable(Protocol):
    """A tuning method that ``tunelab plan`` can model (the optional member of ``TuningMethod``)."""

    def footprint(self, options: BaseModel, shape: ShapeLike) -> Footprint:
        """What this method trains and adds on a model of ``shape`` with ``options``."""
        ...


def block_linears(targets: str | Iterable[str] | None, shape: ShapeLike) -> list[str]:
    """The block linears among ``targets`` (names or dotted paths), by short name; others are not modelled."""
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    known = shape.linears()
    return [t.rsplit(".", 1)[-1] for t in targets if t.rsplit(".", 1)[-1] in known]
