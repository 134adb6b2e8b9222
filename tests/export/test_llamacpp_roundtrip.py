"""A tiny llama exported to GGUF (llama.cpp's converter; its quantizer for the K-quants) and run in llama.cpp
(llama-cpp-python): token ids, chat template parity, greedy answers and perplexity against transformers; a
broken file is caught; ``--out x.gguf`` is the file; and a tiny LoRA run as a GGUF adapter on a GGUF base."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install 'tunelab[export]')")

from tunelab.export import export_model  # noqa: E402
from tunelab.recipes import sft  # noqa: E402


@pytest.mark.parametrize("quant, tensor_type", [("f16", "F16"), ("q8_0", "Q8_0"), ("Q4_K_M", "Q5_0")])
def test_tiny_llama_runs_in_llama_cpp_like_in_transformers(tiny_llama, tmp_path, quant, tensor_type):
    # A random tiny model's logits are nearly flat, so q8_0's rounding flips near-ties in its greedy answers
    # (about half of them): its agreement is measured, not required; the perplexity still barely moves.
    # q4_K_M: llama.cpp's quantizer; rows of 32 values cannot hold 256-value K blocks, so it falls back
    # to q5_0 for those (q8_0 for the token embedding and output matrices).
    report = export_model(tiny_llama, "gguf", quant, tmp_path / "out", prompts=6, new_tokens=12, force=quant != "f16")
    check = report["verification"]
    assert report["quant"] == {"Q4_K_M": "q4_K_M"}.get(quant, quant) and tensor_type in report["tensor_types"]
    assert check["checked"] and (quant != "f16" or not check["failed"])
    assert abs(check["perplexity_increase"]) < (0.05 if quant != "Q4_K_M" else 0.5)
    assert check["stops"]["eos_gguf"] == check["stops"]["eos_tokenizer"] and check["stops"]["chat_template_equal"]
    assert check["prompt_tokens_equal"] == check["n_prompts"] == 6  # the probe: a model dir has no eval data
    assert check["template"]["passed"] and check["template"]["jinja"] == 6
    if quant == "f16":
        assert check["greedy_agreement"] == 1.0 and abs(check["perplexity_increase"]) < 1e-2
    saved = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert saved["verification"]["greedy_agreement"] == check["greedy_agreement"]
    assert "greedy answers equal to the HF model's" in (tmp_path / "out" / "README.md").read_text()


def test_a_wrong_file_is_caught_and_nothing_is_written(tiny_llama, tmp_path, monkeypatch):
    """A GGUF of other weights (same tokenizer and template) answers differently: the check must notice."""
    from safetensors.torch import load_file, save_file

    import tunelab.export.converter as converter
    from tunelab.models.tiny import save_tiny_model

    other = save_tiny_model(tmp_path / "other", "llama")
    state = load_file(other / "model.safetensors")
    save_file({k: v.flip(0).contiguous() for k, v in state.items()}, other / "model.safetensors", metadata={"format": "pt"})
    real = converter.write_gguf
    monkeypatch.setattr(converter, "write_gguf", lambda model_dir, out, quant, name: real(other, out, quant, name))
    with pytest.raises(Exception, match="failed its llama.cpp check.*Nothing was written"):
        export_model(tiny_llama, "gguf", "f16", tmp_path / "out", prompts=6, new_tokens=12)
    assert not (tmp_path / "out").exists()


def test_out_ending_in_gguf_is_the_file(tiny_llama, tmp_path):
    report = export_model(tiny_llama, "gguf", "q8_0", tmp_path / "models" / "tiny.gguf", prompts=2, new_tokens=4, force=True)
    target = tmp_path / "models" / "tiny.gguf"
    assert target.is_file() and target.read_bytes()[:4] == b"GGUF" and report["file"] == "tiny.gguf"
    assert report["output"] == str(target) and [p.name for p in (tmp_path / "models").iterdir()] == ["tiny.gguf"]


def test_lora_run_as_a_gguf_adapter(make_config, tmp_path):
    run = sft.main(make_config("eval.before=false", "eval.max_new_tokens=4", "train.max_steps=4", "train.lr=5e-2",
                               "method.r=4")).run_dir
    report = export_model(run, "gguf-lora", "f16", tmp_path / "lora", prompts=6, new_tokens=12)
    check = report["verification"]
    assert report["lora"]["rank"] == 4 and report["lora"]["tensors"] > 0
    assert check["prompts"].startswith("data.eval") and check["prompt_tokens_equal"] == check["n_prompts"]
    assert check["greedy_agreement"] == 1.0 and not check["failed"]
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == sorted([report["file"], "export_report.json"])
    default = export_model(run, "gguf-lora", "f16", tmp_path / "lora-default", prompts=6)["verification"]
    assert default["new_tokens"] == 4  # on the run's eval examples, as its evaluation generated: the task score is its own
    assert default["task"]["hf"] == json.loads((run / "eval.json").read_text())["tuned"]["score"]
