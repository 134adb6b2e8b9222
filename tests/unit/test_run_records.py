"""Honest run records (issue 37): a full disk is one line and exit 2, a run that stops for any reason is not left
"running", and a resumed run's manifest counts every invocation's training time and keeps its final numbers."""

from __future__ import annotations

import contextlib
import errno
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from safetensors import SafetensorError
from typer.testing import CliRunner

from tunelab.atomic import host_tag
from tunelab.cli import app
from tunelab.clikit import friendly
from tunelab.errors import TunelabError
from tunelab.recipes import sft
from tunelab.training import hooks

FULL = "No space left on device"


def _config(tmp_path: Path, model: Path, data: dict, name: str = "run", steps: int = 6, lr: float = 0.01) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"model: {model}\nmethod: {{name: lora, r: 4}}\n"
        f"data: {{train: {data['train']}, eval: {data['eval']}}}\n"
        f"train: {{max_steps: {steps}, batch_size: 4, lr: {lr}, warmup_ratio: 0, save_every: 2, eval_every: 3, log_every: 1, "
        "seed: 3}\n"
        "eval: {before: false, probe: false, max_new_tokens: 4}\n"
        f"output_dir: {tmp_path / name}\n"
    )
    return path


def _train(config: Path, *args: str):
    return CliRunner().invoke(app, ["train", str(config), *args])


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def slow_steps(monkeypatch):
    """Every optimizer step takes at least 0.4 s of wall time (the first invocation's share of train_seconds)."""
    finish = hooks.finish_step

    def slow(*args, **kwargs):
        time.sleep(0.4)
        return finish(*args, **kwargs)

    monkeypatch.setattr(hooks, "finish_step", slow)
    return lambda: monkeypatch.setattr(hooks, "finish_step", finish)


# --- a full disk -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, FULL), OSError(errno.EDQUOT, "Disk quota exceeded"),
                                   SafetensorError(f'Error while serializing: IoError(Os {{ code: 28, kind: StorageFull, '
                                                   f'message: "{FULL}" }})')],
                         ids=["ENOSPC", "EDQUOT", "safetensors"])
def test_a_full_disk_while_training_is_one_line_and_marks_the_run_failed(tmp_path, tiny_llama, chat_data, monkeypatch, error):
    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr("tunelab.training.checkpoint.save_file", full)
    result = _train(_config(tmp_path, tiny_llama, chat_data))
    assert result.exit_code == 2, result.output
    run = tmp_path / "run"
    assert _errors(result.output) == [f"error: the disk is full writing {run / 'checkpoints' / 'step-00000002'}: free space "
                                      "and rerun with --resume"]
    assert "Traceback" not in result.output
    manifest = _manifest(run)
    assert manifest["status"] == "failed" and "disk is full" in manifest["failure"]


def test_a_disk_too_full_to_record_the_failure_still_gives_the_one_line_error(tmp_path, tiny_llama, chat_data, monkeypatch):
    import tunelab.runs.manifest as manifest_module

    write = manifest_module.write_text_atomic
    broken = []

    def full(*args, **kwargs):
        broken.append(True)
        raise OSError(errno.ENOSPC, FULL)

    def manifest_write(path, text):
        if broken:
            raise OSError(errno.ENOSPC, FULL)
        write(path, text)

    monkeypatch.setattr("tunelab.training.checkpoint.save_file", full)
    monkeypatch.setattr(manifest_module, "write_text_atomic", manifest_write)
    result = _train(_config(tmp_path, tiny_llama, chat_data))
    assert result.exit_code == 2 and len(_errors(result.output)) == 1 and "Traceback" not in result.output, result.output


def test_a_full_disk_outside_training_names_the_file_and_no_resume(capsys):
    """Commands without --resume (merge, export, eval) say to rerun; an error raised from one (e.g. a library's
    RuntimeError over the OSError) is found through its cause."""
    @friendly
    def merge(out: str) -> None:
        try:
            raise OSError(errno.ENOSPC, FULL, "/data/merged/model.safetensors")
        except OSError as err:
            raise RuntimeError("saving failed") from err

    with pytest.raises(typer.Exit) as exit_info:
        merge("x")
    assert exit_info.value.exit_code == 2
    assert capsys.readouterr().err.strip() == "error: the disk is full writing /data/merged/model.safetensors: free space and rerun"


def test_other_os_errors_keep_their_traceback():
    @friendly
    def command() -> None:
        raise OSError(errno.EACCES, "Permission denied", "/x")

    with pytest.raises(PermissionError):
        command()


# --- every way a run ends is recorded ------------------------------------------------------------------------

@pytest.mark.parametrize("error, status, code", [(KeyboardInterrupt(), "interrupted", 130),
                                                 (RuntimeError("a bug"), "failed", 1)], ids=["ctrl-c", "bug"])
def test_a_run_that_stops_is_not_left_running(tmp_path, tiny_llama, chat_data, monkeypatch, error, status, code):
    def stop(*args, **kwargs):
        raise error

    monkeypatch.setattr("tunelab.training.checkpoint.save_file", stop)
    result = _train(_config(tmp_path, tiny_llama, chat_data))
    assert result.exit_code == code, result.output
    manifest = _manifest(tmp_path / "run")
    assert manifest["status"] == status and manifest["failure"], manifest
    if status == "failed":
        assert "RuntimeError: a bug" in manifest["failure"]


def test_a_refused_resume_leaves_the_existing_record_alone(tmp_path, tiny_llama, chat_data):
    config = _config(tmp_path, tiny_llama, chat_data, steps=2)
    assert _train(config).exit_code == 0
    before = _manifest(tmp_path / "run")
    refused = _train(_config(tmp_path, tiny_llama, chat_data, steps=2, lr=0.02), "--resume")
    assert refused.exit_code == 2 and "refusing to resume" in refused.output
    assert _manifest(tmp_path / "run") == before


# --- resume ---------------------------------------------------------------------------------------------------

def test_a_resumed_run_counts_every_invocation_and_keeps_its_final_numbers(tmp_path, tiny_llama, chat_data, monkeypatch,
                                                                          slow_steps):
    """Stopped after step 4 of 6 (4 steps of >= 0.4 s), resumed for the last 2 quick ones."""
    cfg = _config(tmp_path, tiny_llama, chat_data)
    from tunelab.resolve import load_config

    config = load_config(cfg, [])
    monkeypatch.setenv("TUNELAB_TEST_FAIL_AT_STEP", "0:4")
    with pytest.raises(TunelabError, match="failing on purpose"):
        sft.main(config)
    assert _manifest(tmp_path / "run")["status"] == "failed"
    monkeypatch.delenv("TUNELAB_TEST_FAIL_AT_STEP")
    slow_steps()
    result = sft.main(config, resume=True)
    manifest = _manifest(result.run_dir)
    assert manifest["status"] == "finished" and manifest["steps_done"] == 6
    assert manifest["train_seconds"] >= 4 * 0.4 and result.train_seconds >= 4 * 0.4
    logged = _metrics(result.run_dir)
    assert manifest["final_train_loss"] == [r["loss"] for r in logged if "loss" in r][-1]
    assert manifest["final_eval"] == {k: v for k, v in [r for r in logged if "eval_loss" in r][-1].items() if k != "step"}


def test_a_resume_that_finds_training_done_keeps_the_final_numbers(tmp_path, tiny_llama, chat_data, monkeypatch, slow_steps):
    """The disk filled while the adapter was written, after the last step: the resume trains no step, saves the
    adapter and records the numbers of the training that happened (and removes a killed save's temporary)."""
    import tunelab.stages.run as run_stage

    real = run_stage.atomic_dir

    @contextlib.contextmanager
    def full(target):
        with real(target) as tmp:
            yield tmp
            raise OSError(errno.ENOSPC, FULL)

    monkeypatch.setattr(run_stage, "atomic_dir", full)
    config = _config(tmp_path, tiny_llama, chat_data)
    run = tmp_path / "run"
    first = _train(config)
    assert first.exit_code == 2 and _errors(first.output) == [
        f"error: the disk is full writing {run / 'adapter'}: free space and rerun with --resume"], first.output
    assert _manifest(run)["status"] == "failed" and not (run / "adapter").exists()

    monkeypatch.setattr(run_stage, "atomic_dir", real)
    slow_steps()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    killed_save = run / f".adapter.tmp-{child.pid}-{host_tag()}-abcdefgh"
    killed_save.mkdir()
    (killed_save / "adapter_model.safetensors").write_bytes(b"half")
    resumed = _train(config, "--resume")
    assert resumed.exit_code == 0, resumed.output
    manifest = _manifest(run)
    logged = _metrics(run)
    assert manifest["status"] == "finished" and "failure" not in manifest
    assert manifest["final_train_loss"] == [r["loss"] for r in logged if "loss" in r][-1] is not None
    assert manifest["final_eval"]["eval_loss"] == [r for r in logged if "eval_loss" in r][-1]["eval_loss"]
    assert manifest["train_seconds"] >= 6 * 0.4
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".adapter.")]
