"""The tuning method in the planner's terms: which base parameters it trains, what it adds, and how it
changes the forward (LoRA targets, IA3 scales, adapters, virtual tokens, quantisation)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tunelab.config.schema import RunConfig
from tunelab.errors import TunelabError
from tunelab.planning.shape import _LINEARS, ModelShape


@dataclass
class _Method:
    """What a tuning method trains and adds, in the tracer's terms."""

    trainable: set[str] = field(default_factory=set)  # trained base parameters, by name
    extra: int = 0  # parameters the method adds (all trained)
    extra_bytes: int = 4
    lora: dict[str, int] = field(default_factory=dict)  # target linear -> r
    dropout: float = 0.0
    ia3_out: set[str] = field(default_factory=set)  # linears whose output is scaled
    ia3_in: set[str] = field(default_factory=set)  # linears whose input is scaled
    adapters: dict[str, int] = field(default_factory=dict)  # linear followed by an adapter -> bottleneck
    virtual_tokens: int = 0  # prompt tuning: positions added in front of every row
    prefix: int = 0  # prefix tuning: trained key/value positions per block
    quant_bits: int = 0
    double_quant: bool = True
    full_logits: bool = False  # no trained-position shortcut
    input_grad: bool = False  # the embedding output requires grad


def _options(config: RunConfig) -> dict:
    from tunelab.config.load import method_options

    try:
        return method_options(config).model_dump()
    except KeyError:  # not registered in this checkout: the raw options
        return config.method.options()


def _names(targets) -> list[str]:
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    return [t.rsplit(".", 1)[-1] for t in targets if t.rsplit(".", 1)[-1] in _LINEARS]


def _method(config: RunConfig, shape: ModelShape) -> _Method:
    name, opts, lin = config.method.name, _options(config), shape.linears()
    table, m = shape.parameter_table(), _Method()
    if name == "full":
        m.trainable = set(table)
    elif name == "freeze":
        first = shape.layers - int(opts.get("last_n_blocks", 2))
        patterns = [re.compile(p) for p in opts.get("modules") or []]
        m.trainable = {n for n in table if (n.startswith("model.layers.") and int(n.split(".")[2]) >= first)
                       or any(p.search(n) for p in patterns)}
    elif name in ("lora", "qlora"):
        targets = opts.get("target_modules", "all-linear")
        r = int(opts.get("r", 16))
        m.lora = {t: r for t in (list(_LINEARS) if targets == "all-linear" else _names(targets))}
        m.dropout = float(opts.get("dropout", 0.0))
        dora = bool(opts.get("use_dora"))
        tokens = opts.get("trainable_token_indices") or []
        m.extra = shape.layers * sum(r * (lin[t][0] + lin[t][1]) + dora * lin[t][1] for t in m.lora)
        m.extra += len(tokens) * shape.hidden
        m.input_grad = bool(tokens)
        if name == "qlora":
            m.quant_bits, m.double_quant = int(opts.get("bits", 4)), bool(opts.get("double_quant", True))
    elif name == "ia3":
        default_out, default_in = _ia3_defaults(shape.model_type)
        targets = set(_names(opts.get("target_modules") or default_out))
        m.ia3_in = targets & set(_names(opts.get("feedforward_modules") or default_in))
        m.ia3_out = targets - m.ia3_in
        m.extra = shape.layers * (sum(lin[t][1] for t in m.ia3_out) + sum(lin[t][0] for t in m.ia3_in))
    elif name == "prompt":
        m.virtual_tokens = int(opts.get("num_virtual_tokens", 20))
        m.extra, m.full_logits, m.input_grad = m.virtual_tokens * shape.hidden, True, True
    elif name == "prefix":
        m.prefix, width = int(opts.get("num_virtual_tokens", 20)), shape.layers * 2 * shape.kv_heads * shape.head_dim
        hidden = int(opts.get("projection_hidden", 512))
        m.extra = (m.prefix * shape.hidden + shape.hidden * hidden + hidden + hidden * width + width
                   if opts.get("projection") else m.prefix * width)
        m.full_logits = True
    elif name == "adapter":
        bottleneck = int(opts.get("bottleneck", 64))
        m.adapters = {t: bottleneck for t in _names(opts.get("target_modules") or ["o_proj", "down_proj"])}
        m.extra = shape.layers * sum(2 * lin[t][1] * bottleneck + bottleneck + lin[t][1] for t in m.adapters)
    else:
        raise TunelabError(f"tunelab plan does not model method {name!r}; it models full, freeze, lora, qlora, "
                           "ia3, prompt, prefix and adapter")
    try:
        from tunelab.training.loss import _PLAIN_HEAD_MODEL_TYPES as plain
    except ImportError:  # the loss module changed: assume the families it has always covered
        plain = frozenset({"llama", "mistral", "qwen2", "qwen3"})
    m.full_logits = m.full_logits or shape.model_type not in plain
    return m


def _ia3_defaults(model_type: str) -> tuple[list[str], list[str]]:
    """peft's default IA3 targets and feed-forward targets for an architecture (llama's if unknown)."""
    try:
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as feedforward,
            TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as targets,
        )
    except ImportError:
        return ["k_proj", "v_proj", "down_proj"], ["down_proj"]
    return targets.get(model_type, targets["llama"]), feedforward.get(model_type, feedforward["llama"])
