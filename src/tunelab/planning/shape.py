"""The model's shape: the sizes of a decoder-only transformer, read from its config.json (weights are
never loaded), and its parameter table as transformers names it."""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.config.schema import RunConfig
from tunelab.errors import TunelabError

_LINEARS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
            "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer, read from its config."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # qwen3, qwen3_moe: per-head RMSNorm of q and k
    experts: int = 0  # routed experts per block (MoE), each a gated MLP of expert_intermediate
    active_experts: int = 0  # experts each token is routed to
    expert_intermediate: int = 0

    @classmethod
    def from_config(cls, cfg) -> "ModelShape":
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        heads, bias = cfg.num_attention_heads, bool(getattr(cfg, "attention_bias", False))
        return cls(
            model_type=getattr(cfg, "model_type", "?"), hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
            layers=cfg.num_hidden_layers, heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=_widest(cfg, "head_dim") or cfg.hidden_size // heads, vocab=cfg.vocab_size,
            tied=bool(getattr(cfg, "tie_word_embeddings", False)), qkv_bias=bias or cfg.model_type == "qwen2",
            o_bias=bias, mlp_bias=bool(getattr(cfg, "mlp_bias", False)), qk_norm=cfg.model_type in ("qwen3", "qwen3_moe"),
            **_experts(cfg),
        )

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """The block's linear layers: name -> (d_in, d_out, has bias)."""
        d, dq, dkv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (d, dq, self.qkv_bias), "k_proj": (d, dkv, self.qkv_bias), "v_proj": (d, dkv, self.qkv_bias),
                "o_proj": (dq, d, self.o_bias), "gate_proj": (d, i, self.mlp_bias), "up_proj": (d, i, self.mlp_bias),
                "down_proj": (i, d, self.mlp_bias)}

    def parameter_table(self) -> dict[str, int]:
        """Parameter name, as transformers names it in llama-style models -> element count."""
        table = {"model.embed_tokens.weight": self.vocab * self.hidden}
        for b in range(self.layers):
            for name, (d_in, d_out, bias) in self.linears().items():
                if self.experts and _LINEARS[name] == "mlp":
                    continue  # a MoE block's MLP is its experts
                table[param_name(b, name)] = d_in * d_out
                if bias:
                    table[param_name(b, name, "bias")] = d_out
            table[f"model.layers.{b}.input_layernorm.weight"] = self.hidden
            table[f"model.layers.{b}.post_attention_layernorm.weight"] = self.hidden
            if self.qk_norm:
                table[f"model.layers.{b}.self_attn.q_norm.weight"] = self.head_dim
                table[f"model.layers.{b}.self_attn.k_norm.weight"] = self.head_dim
            if self.experts:  # fused, as transformers stores them: (experts, 2 x I_e, d) and (experts, d, I_e)
                table[f"model.layers.{b}.mlp.experts.gate_up_proj"] = self.experts * 2 * self.expert_intermediate * self.hidden
                table[f"model.layers.{b}.mlp.experts.down_proj"] = self.experts * self.expert_intermediate * self.hidden
                table[f"model.layers.{b}.mlp.gate.weight"] = self.experts * self.hidden  # the router
        table["model.norm.weight"] = self.hidden
        if not self.tied:
            table["lm_head.weight"] = self.vocab * self.hidden
        return table

    def active_parameters(self) -> int:
        """Parameters one token passes through: all but the experts it is not routed to."""
        table = self.parameter_table()
        experts = sum(n for name, n in table.items() if ".mlp.experts." in name)
        return sum(table.values()) - experts + experts * self.active_experts // max(self.experts, 1)

    @property
    def head_param(self) -> str:
        return "model.embed_tokens.weight" if self.tied else "lm_head.weight"


def _experts(cfg) -> dict[str, int]:
    """The MoE sizes of a config (nothing for a dense model)."""
    from tunelab.models.anatomy import expert_count

    experts = expert_count(cfg)
    if not experts:
        return {}
    active = getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "experts_per_token", None) or 1
    width = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    return {"experts": experts, "active_experts": int(active), "expert_intermediate": int(width)}


def _widest(cfg, name: str) -> int | None:
    """``cfg.name``; for a config whose layers differ in it (Gemma 4's ``per_layer_config``), the largest value,
    so the memory plan is an upper bound."""
    try:
        return getattr(cfg, name, None)
    except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError
        values = [cfg.to_dict().get(name)] + [layer.get(name) for layer in (cfg.to_dict().get("per_layer_config") or {}).values()]
        return max((v for v in values if v), default=None)


def param_name(block: int, linear: str, kind: str = "weight") -> str:
    return f"model.layers.{block}.{_LINEARS[linear]}.{linear}.{kind}"


# Shapes of the embedded models, so that planning never has to download and convert one.
_EMBEDDED_SHAPES = {"smollm2-135m-instruct": ModelShape("llama", 576, 1536, 30, 9, 3, 64, 49152, tied=True)}


def embedded_shape(path: str) -> ModelShape | None:
    """The stored shape of an embedded model that is not converted yet (planning never converts one), else None."""
    from tunelab.models.embedded import cached_path

    return _EMBEDDED_SHAPES[path] if path in _EMBEDDED_SHAPES and cached_path(path) is None else None


def load_shape(config: RunConfig) -> ModelShape:
    """The model's shape from its config.json (AutoConfig: no weights are read)."""
    from transformers import AutoConfig

    from tunelab.models.load import resolve_model_path

    embedded = embedded_shape(config.model.path)
    if embedded is not None:
        return embedded
    path = resolve_model_path(config.model.path)
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise TunelabError(f"model.path: cannot read the config of {config.model.path!r}: {exc}") from None
    try:
        return ModelShape.from_config(cfg)
    except AttributeError as exc:  # e.g. GPT-2 style configs (n_inner instead of intermediate_size)
        raise TunelabError(f"tunelab plan models llama-style decoders; the config of {config.model.path!r} is not one "
                           f"({exc})") from None
