"""The architectures of the matrix: each transformers model type, with the config settings (beyond
``tunelab.models.tiny.save_tiny_of_type``'s common tiny ones) that make a 2-block random model of it, and
the cells of the matrix. Plain data, read by the test and by the table generator (``table.py``)."""

from __future__ import annotations

_HYBRID = {"linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
           "layer_types": ["linear_attention", "full_attention"]}
_SLIDING = {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64}

# model_type -> (what it stands for, config settings)
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("Llama 3.x, SmolLM2", {}),
    "mistral": ("Mistral", {}),
    "qwen2": ("Qwen 2.5", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen 3", {"head_dim": 16}),
    "qwen3_moe": ("Qwen3-MoE", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "qwen3_5_text": ("Qwen 3.5 (hybrid linear attention)", {"head_dim": 16, **_HYBRID}),
    "qwen3_next": ("Qwen3-Next (hybrid, MoE)", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                                "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, **_HYBRID}),
    "gemma2": ("Gemma 2", _SLIDING),
    "gemma3_text": ("Gemma 3", _SLIDING),
    "gemma4_text": ("Gemma 4", {"head_dim": 16, "sliding_window": 64, "vocab_size_per_layer_input": 320,
                                "hidden_size_per_layer_input": 8, "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi-3, Phi-4", {}),
    "olmo2": ("OLMo 2", {}),
    "olmo3": ("OLMo 3", {"sliding_window": 64}),
    "granite": ("Granite", {}),
    "smollm3": ("SmolLM3", {}),
    "lfm2": ("LFM2 (hybrid convolution)", {"layer_types": ["conv", "full_attention"]}),
    "cohere2": ("Command R7B", {"sliding_window": 64}),
    "mixtral": ("Mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "gpt_oss": ("gpt-oss", {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 64}),
    "deepseek_v3": ("DeepSeek-V3", {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "q_lora_rank": 32,
                                    "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
                                    "num_key_value_heads": 4}),
}

MOE = frozenset({"qwen3_moe", "qwen3_next", "mixtral", "gpt_oss", "deepseek_v3"})

# The cells, in table order: (id, what it checks).
CELLS: list[tuple[str, str]] = [
    ("lora", "LoRA SFT trains 2 steps and saves (MoE: experts too, routers frozen)"),
    ("merge", "the LoRA run merged, reloaded and verified against the adapter"),
    ("full", "full SFT"), ("ia3", "IA3 (targets found in the model)"), ("prefix", "prefix tuning"),
    ("prompt", "prompt tuning"), ("dora", "DoRA on a MoE model's experts"), ("plan", "`tunelab plan` answers (MoE: active of total)"),
    ("serve", "served greedy answers equal `tunelab eval`'s, both schedulers"),
    ("resume", "LoRA SFT failed after step 1 and resumed from its checkpoint: the adapter bit-identical to the lora cell's"),
    ("dpo", "`recipe: dpo` with LoRA trains 2 steps on preference pairs and saves"),
    ("grpo", "`recipe: grpo` with LoRA trains 2 steps (2 completions per prompt, a built-in reward) and saves"),
]

_NO_KV = "keep no keys and values to put a prefix in front of"
_PER_LAYER_IDS = "reads its own embedding of the token ids"
# (model_type, cell) -> the pattern the refusal's message matches: cells that cannot work and are refused by name.
REFUSED: dict[tuple[str, str], str] = {
    ("qwen3_5_text", "prefix"): _NO_KV, ("qwen3_next", "prefix"): _NO_KV, ("lfm2", "prefix"): _NO_KV,
    ("deepseek_v3", "prefix"): "latent", ("gemma4_text", "prefix"): _PER_LAYER_IDS,
    ("gemma4_text", "prompt"): _PER_LAYER_IDS,
    **{(moe, "dora"): "no DoRA for fused expert weights" for moe in sorted(MOE)},
}

TINY_OPTIONS = {"lora": ["method.r=4"], "prefix": ["method.num_virtual_tokens=4"], "prompt": ["method.num_virtual_tokens=4"]}
