"""The GGUF exporter's contract over architectures: a tiny random model of each type (2 layers, width 64, built
in-process from the type's config class, with tunelab's tiny byte-level BPE tokenizer and ChatML template) is
written by llama.cpp's converter, loaded by llama.cpp, and answers like transformers (greedy tokens equal, the
perplexity of its answers within f16 rounding); the file stops where the template ends a turn and holds that
template. A type llama.cpp's converter does not know is refused naming it, with nothing written.

Not covered: phi3 with this tokenizer (llama.cpp's phi3 vocabulary loader fails on a non-Phi byte-level BPE
vocabulary; real Phi-3/Phi-4 tokenizers are sentencepiece or GPT-2 ones, which the converter handles).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install 'tunelab[export]')")

from tunelab.errors import TunelabError  # noqa: E402
from tunelab.export import export_model  # noqa: E402

# model_type -> (GGUF architecture llama.cpp runs it as, config settings beyond the common tiny ones)
ARCHITECTURES = {
    "llama": ("llama", {}),
    "mistral": ("llama", {}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "gemma3_text": ("gemma3", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {}),
}


def save_tiny(folder: Path, model_type: str, **settings) -> Path:
    """A tiny random model of ``model_type`` with the tiny tokenizer, saved as an HF directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **settings)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_each_architecture_is_written_by_llama_cpp_and_answers_like_transformers(tmp_path, model_type):
    arch, settings = ARCHITECTURES[model_type]
    model_dir = save_tiny(tmp_path / model_type, model_type, **settings)
    report = export_model(model_dir, "gguf", "f16", tmp_path / "out", prompts=3, new_tokens=8)
    check = report["verification"]
    assert report["architecture"] == arch and report["file"] == f"{model_type}-f16.gguf"
    assert check["checked"] and not check["failed"], check["failed"]
    assert check["prompt_tokens_equal"] == check["n_prompts"] == 3 and check["template"]["passed"]
    assert check["greedy_agreement"] == 1.0, check["differing"]
    assert abs(check["perplexity_increase"]) < 1e-3
    stops = check["stops"]
    assert stops["eos_gguf"] == stops["eos_tokenizer"] and not stops["not_end_of_generation"]
    assert stops["chat_template_equal"]


def test_an_architecture_llama_cpp_does_not_convert_is_refused_naming_it(tmp_path):
    model_dir = save_tiny(tmp_path / "opt", "opt", ffn_dim=128, word_embed_proj_dim=64)
    with pytest.raises(TunelabError, match=r"does not support the architecture OPTForCausalLM.*--format hf"):
        export_model(model_dir, "gguf", "f16", tmp_path / "out", force=True)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
