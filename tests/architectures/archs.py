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
