"""The embedded models exported to GGUF by llama.cpp's converter and run in llama.cpp: SmolLM2's greedy answers
equal transformers' (f16) and its q4_K_M export stays close; Gemma 3 270M (the second embedded model, refused by
the old hand-written writer) with tunelab's Gemma chat template answers like transformers and stops at
``<end_of_turn>``; a few-step LoRA run of SmolLM2 exported merged gives llama.cpp answers equal to the merged HF
model's.

Slow (a few minutes each on 2 CPU cores: 135M/270M-parameter models converted and decoded in both runtimes);
the tiny-model contract (tests/export/test_architectures.py) covers the architectures, these cover real
tokenizers, real weights and the quantizer on real matrices (256-value K-quant blocks that tiny widths lack).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install 'tunelab[export]')")


def test_smollm2_f16_gguf_answers_like_transformers(tmp_path):
    from tunelab.export import export_model
    from tunelab.models.load import resolve_model_path

    model_dir = resolve_model_path("smollm2-135m-instruct")
    report = export_model(model_dir, "gguf", "f16", tmp_path / "gguf", prompts=6, new_tokens=24)
    check = report["verification"]
    assert check["checked"] and not check["failed"], check["failed"]
    assert check["prompt_tokens_equal"] == check["n_prompts"] == 6
    assert check["template"]["passed"]
    assert check["greedy_agreement"] == 1.0, check["differing"]
    assert check["hf_answers"] == check["gguf_answers"] and any(check["hf_answers"])
    assert abs(check["perplexity_increase"]) < 0.01
    import gguf

    names = {t.name for t in gguf.GGUFReader(tmp_path / "gguf" / report["file"]).tensors}
    assert "output.weight" not in names and len(names) == 2 + 30 * 9  # tied embeddings: llama.cpp reuses token_embd
    modelfile = (tmp_path / "gguf" / "Modelfile").read_text()
    assert "You are a helpful AI assistant named SmolLM" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_smollm2_q4_k_m_gguf_is_quantized_by_llama_cpp_and_stays_close(tmp_path):
    from tunelab.export import export_model
    from tunelab.models.load import resolve_model_path

    report = export_model(resolve_model_path("smollm2-135m-instruct"), "gguf", "q4_K_M", tmp_path / "q4.gguf", prompts=6,
                          new_tokens=24)
    check = report["verification"]
    assert (tmp_path / "q4.gguf").is_file() and not check["failed"], check["failed"]
    assert report["tensor_types"].get("Q4_K", 0) > 0 and report["tensor_types"].get("Q6_K", 0) > 0
    assert check["stops"]["eos_gguf"] == check["stops"]["eos_tokenizer"] and not check["stops"]["not_end_of_generation"]


def test_gemma3_with_its_chat_template_answers_like_transformers_and_stops(tmp_path):
    """The base model has no template; tunelab trains it with its Gemma template (``<end_of_turn>`` is eos then)."""
    from transformers import AutoTokenizer

    from tunelab.data import prepare_tokenizer
    from tunelab.export import export_model
    from tunelab.models.load import resolve_model_path

    source = tmp_path / "gemma3-chat"
    source.mkdir()
    original = resolve_model_path("gemma3-270m")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (source / name).symlink_to(f"{original}/{name}")
    tokenizer = AutoTokenizer.from_pretrained(original)
    prepare_tokenizer(tokenizer, "auto")
    tokenizer.save_pretrained(source)
    report = export_model(source, "gguf", "f16", tmp_path / "gguf", prompts=4, new_tokens=16)
    check = report["verification"]
    assert report["architecture"] == "gemma3" and not check["failed"], check["failed"]
    assert check["greedy_agreement"] == 1.0, check["differing"]
    stops = check["stops"]
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert stops["eos_gguf"] == end_of_turn == stops["eos_tokenizer"] and stops["chat_template_equal"]
    assert end_of_turn in stops["end_of_turn"] and not stops["not_end_of_generation"]


def test_few_step_lora_run_of_smollm2_exported_merged(tmp_path, chat_data):
    from tunelab.resolve import load_config
    from tunelab.export import export_model
    from tunelab.recipes import sft

    config = load_config(None, ["model=smollm2-135m-instruct", f"data.train={chat_data['train']}",
                                f"data.eval={chat_data['eval']}", f"output_dir={tmp_path / 'run'}", "train.max_steps=3",
                                "train.batch_size=4", "train.lr=1e-3", "method.name=lora", "method.r=8",
                                "eval.before=false", "eval.probe=false", "eval.max_new_tokens=8"])
    run = sft.main(config).run_dir
    report = export_model(run, "gguf", "f16", tmp_path / "gguf", prompts=4, new_tokens=16)
    check = report["verification"]
    assert report["merge"]["verification"]["passed"]
    assert check["prompts"].startswith("data.eval") and not check["failed"], check["failed"]
    assert check["greedy_agreement"] == 1.0, check["differing"]
