"""The tuning method in the planner's terms: which base parameters it trains, what it adds, and how it
changes the forward (LoRA targets, IA3 scales, adapters, virtual tokens, quantisation).

Each method describes itself (``footprint(options, shape)``, see ``tunelab.methods.footprint``); this
module only asks it and adds what depends on the model rather than on the method."""

from __future__ import annotations

from dataclasses import dataclass, fields

from tunelab.config.schema import RunConfig
from tunelab.errors import TunelabError
from tunelab.methods.footprint import Footprint
from tunelab.planning.shape import ModelShape


@dataclass
class PlannedMethod(Footprint):
    """A method's footprint as the tracer uses it."""

    extra_bytes: int = 4  # per added parameter (the planner sets the weight dtype's where the method says so)


def planned_method(config: RunConfig, shape: ModelShape) -> PlannedMethod:
    """Ask the configured method for its footprint on ``shape``.

    Raises:
        TunelabError: the method is not registered, or does not describe itself to the planner.
    """
    from tunelab.methods import METHODS

    name = config.method.name
    method = METHODS.find(name)
    if method is None:
        raise TunelabError(f"method.name: cannot plan method {name!r}: {METHODS.unknown(name)}")
    if method.footprint is None:
        raise TunelabError(f"cannot plan method {name!r}: it does not say what it trains and adds (it has no "
                           "footprint(options, shape) method, see tunelab.methods.footprint); tunelab plan "
                           "estimates only methods that do")
    footprint = method.footprint(config.method, shape)
    m = PlannedMethod(**{f.name: getattr(footprint, f.name) for f in fields(Footprint)})
    try:
        from tunelab.training.loss import PLAIN_HEAD_MODEL_TYPES as plain
    except ImportError:  # the loss module changed: assume the families it has always covered
        plain = frozenset({"llama", "mistral", "qwen2", "qwen3"})
    m.full_logits = m.full_logits or shape.model_type not in plain
    return m
