"""What a model is made of, read from its config or its modules, never from a list of model-type names.

Methods use it to find their targets (IA3's keys, values and feed-forward outputs; LoRA's fused expert
weights) and to refuse, before anything loads, a model their mechanism cannot work on (a prefix of keys and
values on layers that keep none). Written here because peft's defaults are tables keyed by model type
(``TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING``), which miss most current architectures.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

ATTENTION_LAYERS = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")
# Last component of a module name that computes keys or values (alone, fused with queries, or compressed).
_KEY_VALUE = re.compile(r"^(k|v|key|value|wk|wv|k_proj|v_proj|kv_proj)$|qkv|kv_(a|b)_proj")


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def non_attention_layers(config: Any) -> list[str]:
    """The kinds of decoder layers that are not softmax attention (``linear_attention``, ``conv``...), sorted."""
    kinds = getattr(text_config(config), "layer_types", None) or []
    return sorted(set(kinds) - ATTENTION_LAYERS)


def uneven_keys_values(config: Any) -> str | None:
    """Why the layers' keys and values are not all ``kv_heads x head_dim`` vectors of one width, or None."""
    cfg = text_config(config)
    if getattr(cfg, "kv_lora_rank", None):
        return "its attention compresses keys and values into a shared latent (multi-head latent attention)"
    overrides = (cfg.to_dict().get("per_layer_config") or {}) if hasattr(cfg, "to_dict") else {}
    varying = sorted({k for layer in overrides.values() for k in layer if k in ("head_dim", "num_key_value_heads")})
    if varying:
        return f"its layers differ in {', '.join(varying)}"
    return None


def reads_ids_in_every_layer(config: Any) -> bool:
    """Whether every layer takes its own embedding of the token ids (Gemma 4's per-layer inputs)."""
    return bool(getattr(text_config(config), "hidden_size_per_layer_input", None))


def expert_count(config: Any) -> int:
    """Routed experts per MoE layer (0 for a dense model)."""
    cfg = text_config(config)
    return next((int(n) for n in (getattr(cfg, k, None) for k in _EXPERT_COUNTS) if n), 0)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks: the first ``nn.ModuleList`` with ``num_hidden_layers`` entries."""
    n = getattr(text_config(model.config), "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not lists:
        raise ValueError(f"found no list of {n} decoder blocks in {type(model).__name__}")
    return lists[0]


def _block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def ia3_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """IA3's targets found in the model: (targets, feed-forward targets), as block-relative module names.

    Keys and values: the linear layers whose name says they compute keys or values (``k_proj``, ``v_proj``,
    fused ``qkv_proj``, DeepSeek's ``kv_a/b_proj``, ...). Feed-forward: in a part of the block without those,
    each linear layer that writes the hidden size from the width a sibling linear reads the hidden size into
    (``down_proj`` after ``up_proj``, ``w2`` after ``w1``, a fused ``gate_up_proj``'s half): scaled on its input.
    """
    hidden = text_config(model.config).hidden_size
    targets: set[str] = set()
    feedforward: set[str] = set()
    for block in decoder_blocks(model):
        linears = _block_linears(block)
        kv = {name for name in linears if _KEY_VALUE.search(name.rpartition(".")[2])}
        attention_parts = {_parent(name) for name in kv}
        for name, layer in linears.items():
            if _parent(name) in attention_parts or layer.out_features != hidden or layer.in_features == hidden:
                continue
            widths = {s.out_features for n, s in linears.items() if _parent(n) == _parent(name) and s.in_features == hidden}
            if layer.in_features in widths or 2 * layer.in_features in widths:
                feedforward.add(name)
        targets |= kv
    return sorted(targets | feedforward), sorted(feedforward)


def _is_router(module: nn.Module, experts: int, hidden: int) -> bool:
    """A MoE router: its weight maps the hidden state to one logit per expert."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and tuple(weight.shape) == (experts, hidden)


def linears_but_routers(model: nn.Module) -> list[str]:
    """peft's ``all-linear`` without the MoE routers: the linear layers of the blocks (block-relative names) and
    outside them (full names), the output layer and any router left out."""
    experts, hidden = expert_count(model.config), text_config(model.config).hidden_size
    blocks, output = decoder_blocks(model), model.get_output_embeddings()
    inside = {id(m) for m in blocks.modules()}
    names = {name for block in blocks for name, m in block.named_modules()
             if isinstance(m, nn.Linear) and not _is_router(m, experts, hidden)}
    names |= {name for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and id(m) not in inside and m is not output and not _is_router(m, experts, hidden)}
    return sorted(names)


def expert_parameters(model: nn.Module) -> list[str]:
    """Block-relative names of fused expert weights: 3-D parameters (experts x d_out x d_in) of the blocks."""
    experts = expert_count(model.config)
    names: set[str] = set()
    for block in decoder_blocks(model):
        names |= {name for name, p in block.named_parameters() if p.ndim == 3 and p.shape[0] == experts}  # not a conv's
    return sorted(names)
