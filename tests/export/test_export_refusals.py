"""`tunelab export` on tiny models without llama.cpp: bad input is refused before anything is written, a failure
mid-write leaves nothing behind, --force publishes an unchecked file and says so, and the HF format."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from tunelab.errors import TunelabError
from tunelab.export import export_model
from tunelab.recipes import sft

QUICK = ("eval.before=false", "eval.max_new_tokens=4", "train.max_steps=1")


@pytest.fixture
def no_llama_cpp(monkeypatch):
    monkeypatch.setattr("tunelab.export.llamacpp.llama_cpp_version", lambda: None)


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_unchecked_export_needs_force_and_says_so(tiny_llama, tmp_path, no_llama_cpp):
    with pytest.raises(TunelabError, match=r"llama-cpp-python.*tunelab\[export\].*--force"):
        export_model(tiny_llama, "gguf", "f16", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)
    report = export_model(tiny_llama, "gguf", "q8_0", tmp_path / "out", force=True)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted(["Modelfile", "README.md", "export_report.json", report["file"]])
    assert report["verification"]["checked"] is False and report["verification"]["forced"] is True
    assert json.loads((tmp_path / "out" / "export_report.json").read_text()) == report
    assert "Not checked in llama.cpp" in (tmp_path / "out" / "README.md").read_text()
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert f"FROM ./{report['file']}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile and "TEMPLATE" in modelfile


def test_a_failure_mid_write_leaves_nothing(tiny_llama, tmp_path, monkeypatch, no_llama_cpp):
    import tunelab.export.converter as converter

    def half_then_fail(model_dir, path, *args, **kwargs):
        path.write_bytes(b"GGUF half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(converter, "write_gguf", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        export_model(tiny_llama, "gguf", "f16", tmp_path / "out", force=True)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_bad_arguments_and_outputs_are_refused(tiny_llama, tmp_path):
    with pytest.raises(TunelabError, match="--format 'onnx'"):
        export_model(tiny_llama, "onnx")
    with pytest.raises(TunelabError, match="--quant 'q2_k'.*q4_K_M"):
        export_model(tiny_llama, "gguf", "q2_k")
    with pytest.raises(TunelabError, match="neither a tunelab run directory"):
        export_model(tmp_path, "gguf")
    with pytest.raises(TunelabError, match="gguf-lora exports a run's LoRA adapter"):
        export_model(tiny_llama, "gguf-lora")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(TunelabError, match="exists and is not an earlier export"):
        export_model(tiny_llama, "gguf", out=busy)
    assert (busy / "notes.txt").read_text() == "keep me"


def test_prompt_tuning_run_is_refused_with_the_reason(make_config, tmp_path):
    run = sft.main(make_config(*QUICK, "method.num_virtual_tokens=4", method="prompt")).run_dir
    for fmt in ("gguf", "hf"):
        with pytest.raises(TunelabError, match="export needs the run as one model.*virtual tokens.*Serve the adapter"):
            export_model(run, fmt, out=tmp_path / "out")
    with pytest.raises(TunelabError, match="gguf-lora.*not LoRA"):
        export_model(run, "gguf-lora", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_base_is_refused_naming_it(make_config, tmp_path, tiny_llama):
    base = tmp_path / "base-copy"
    shutil.copytree(tiny_llama, base)
    run = sft.main(make_config(*QUICK, model=base)).run_dir
    shutil.rmtree(base)
    with pytest.raises(TunelabError, match=f"base model {base}.* is missing"):
        export_model(run, "gguf", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hf_export_of_a_run_is_the_verified_merge(make_config, tmp_path):
    from transformers import AutoModelForCausalLM

    run = sft.main(make_config(*QUICK, "method.r=4")).run_dir
    result = CliRunner().invoke(_app(), ["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "hf" / "export_report.json").read_text())
    assert report["format"] == "hf" and report["merge"]["verification"]["passed"]
    assert (tmp_path / "hf" / "merge_report.json").is_file() and (tmp_path / "hf" / "README.md").is_file()
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf")


def test_cli_reports_user_errors_without_a_traceback(tiny_llama, tmp_path):
    result = CliRunner().invoke(_app(), ["export", str(tiny_llama), "--quant", "q3_k_s", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--quant 'q3_k_s'" in result.output and "Traceback" not in result.output


def _app():
    import typer

    from tunelab.export.cli import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # two commands, so typer keeps the subcommand name
    return app


@pytest.mark.parametrize("change, reason", [({"use_dora": True}, "DoRA"),
                                            ({"modules_to_save": ["lm_head"]}, "trained embedding rows or whole modules"),
                                            ({"rank_pattern": {"q_proj": 8}}, "per-module ranks")])
def test_lora_adapters_a_gguf_lora_cannot_hold_are_refused(tmp_path, change, reason):
    from tunelab.export.gguf_lora import check_lora_config

    artifact = tmp_path / "adapter"
    artifact.mkdir()
    (artifact / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **change}))
    with pytest.raises(TunelabError, match=f"gguf-lora.*{reason}.*--format gguf instead"):
        check_lora_config(artifact)
