"""The embedded SmolLM2 exported to GGUF and run in llama.cpp: its greedy answers equal transformers' (f16), and a
few-step LoRA run of it exported merged gives llama.cpp answers equal to the merged HF model's.

Slow (a few minutes on 2 CPU cores: a 135M-parameter model written as GGUF and decoded in both runtimes).
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
