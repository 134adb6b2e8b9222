"""``recipe: dpo`` on tiny models: held-out preference metrics rise, every reference mode computes the same loss,
cached reference log-probabilities are reused, bad pair files are refused whole, SIGKILL resume is bit-identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.resolve import load_config
from tunelab.errors import ConfigError, DataError
from tunelab.recipes import dpo, sft

REPO = Path(__file__).resolve().parents[2]
WORDS = ["red", "blue", "green", "black", "white", "pink"]


def pair_records(n: int, start: int = 0) -> list[dict]:
    """One preference a tiny model learns in a few steps, and generalises to unseen prompts: a polite answer."""
    return [{"prompt": f"Colour {i}?", "chosen": f"It is {WORDS[i % 6]}, thanks.", "rejected": f"It is {WORDS[i % 6]}!"}
            for i in range(start, start + n)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def pairs(tmp_path) -> dict[str, Path]:
    return {"train": write_jsonl(tmp_path / "pairs.jsonl", pair_records(16)),
            "eval": write_jsonl(tmp_path / "held.jsonl", pair_records(6, start=50))}


@pytest.fixture
def dpo_config(tmp_path, pairs, tiny_llama):
    def build(*overrides: str, output: str = "dpo", method: str = "lora"):
        base = [f"model={tiny_llama}", "recipe.name=dpo", f"data.train={pairs['train']}", f"data.eval={pairs['eval']}",
                f"output_dir={tmp_path / output}", "train.batch_size=4", "train.lr=5e-2", "train.max_steps=8",
                "train.warmup_ratio=0", "eval.probe=false", "eval.before=false"]
        base += ["method.name=lora", "method.r=4"] if method == "lora" else [f"method.name={method}"]
        return load_config(None, base + list(overrides))
    return build


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dpo_raises_held_out_preference_accuracy_and_margin(dpo_config):
    result = dpo.main(dpo_config())
    report = json.loads((result.run_dir / "eval.json").read_text())
    before, after = report["preference"]["before"], report["preference"]["after"]
    assert before["eval_margin"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as its own reference
    assert after["eval_margin"] > 0.05 and after["eval_accuracy"] > 0.5 and after["eval_pref_loss"] < before["eval_pref_loss"]
    logged = [m for m in metrics(result.run_dir) if "loss" in m]
    assert len(logged) == 8 and {"rewards/margin", "rewards/accuracy", "logp_accuracy"} <= logged[0].keys()
    assert json.loads((result.run_dir / "manifest.json").read_text())["recipe"] == "dpo"


def _final_losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in metrics(run_dir) if "loss" in m]


def test_live_and_precomputed_references_give_the_same_losses(dpo_config, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    live = dpo.main(dpo_config("train.max_steps=3", output="live")).run_dir
    cached = dpo.main(dpo_config("train.max_steps=3", "recipe.precompute_reference=true", output="cached")).run_dir
    assert _final_losses(live) == pytest.approx(_final_losses(cached), abs=1e-5)
    # a second run over the same pairs reads the cached table instead of computing it
    capsys.readouterr()
    from rich.console import Console

    console = Console(file=sys.stderr)
    dpo.main(dpo_config("train.max_steps=3", "recipe.precompute_reference=true", output="again"), console=console)
    assert "Computing the reference" not in capsys.readouterr().err


@pytest.mark.parametrize("loss, extra", [("ipo", []), ("hinge", []), ("orpo", ["recipe.orpo_lambda=0.2"]),
                                         ("simpo", ["recipe.beta=2", "recipe.gamma=0.3"])])
def test_every_registered_loss_trains(dpo_config, loss, extra):
    result = dpo.main(dpo_config(f"recipe.loss={loss}", "train.max_steps=4", *extra, output=loss))
    losses = _final_losses(result.run_dir)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


def test_full_fine_tuning_and_a_continued_parent_use_a_precomputed_reference(dpo_config, make_config, capsys, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))  # an empty reference cache: the table is computed here
    dpo.main(dpo_config("train.max_steps=2", output="full", method="full"))
    assert "Computing the reference" in capsys.readouterr().err
    parent = sft.main(make_config("eval.before=false", "eval.max_new_tokens=4", "train.max_steps=3", output="sft")).run_dir
    child = dpo.main(dpo_config("train.max_steps=2", f"init_from={parent}", output="child"))
    assert "Computing the reference" in capsys.readouterr().err
    manifest = json.loads((child.run_dir / "manifest.json").read_text())
    assert manifest["parent"]["run_dir"] == str(parent.resolve())


def test_loss_options_the_loss_does_not_read_are_refused(dpo_config):
    with pytest.raises(ConfigError, match="loss sigmoid does not read gamma"):
        dpo_config("recipe.gamma=1.0")
    with pytest.raises(ConfigError, match="unknown preference loss 'dpo2'"):
        dpo_config("recipe.loss=dpo2")


def test_bad_pairs_are_reported_together_and_nothing_is_written(dpo_config, pairs, tmp_path):
    write_jsonl(pairs["train"], [pair_records(1)[0], {"prompt": "x", "chosen": "same", "rejected": "same"},
                                 {"prompt": "x", "chosen": "a"}, '{"prompt": "x", "chosen": '])
    with pytest.raises(DataError) as err:
        dpo.main(dpo_config())
    text = str(err.value)
    assert "pairs.jsonl:2" in text and "pairs.jsonl:3" in text and "pairs.jsonl:4" in text
    assert not (tmp_path / "dpo").exists()


def _cli(config: Path, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "tunelab", "train", str(config), *args], capture_output=True, text=True,
                          env=env, cwd=REPO)


@pytest.mark.parametrize("precompute", [False, True])
def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_llama, pairs, precompute):
    def config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"recipe: {{name: dpo, precompute_reference: {str(precompute).lower()}}}\nmodel: {tiny_llama}\n"
                        "method: {name: lora, r: 4, dropout: 0.1}\n"
                        f"data: {{train: {pairs['train']}, eval: {pairs['eval']}}}\n"
                        "train: {max_steps: 6, batch_size: 4, grad_accum: 2, lr: 0.02, save_every: 2, seed: 3}\n"
                        f"eval: {{probe: false, before: false}}\noutput_dir: {tmp_path / name}\n")
        return path
    assert _cli(config("straight")).returncode == 0
    crash = _cli(config("killed"), env_extra={"TUNELAB_TEST_SIGKILL_AT_STEP": "3"})
    assert crash.returncode == -9, crash.stderr
    resumed = _cli(config("killed"), "--resume")
    assert resumed.returncode == 0 and "Resuming from" in resumed.stderr, resumed.stderr
    a = load_file(tmp_path / "straight/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "killed/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _final_losses(tmp_path / "straight") == _final_losses(tmp_path / "killed")


def test_data_inspect_shows_both_sides_of_a_pair(tmp_path, tiny_llama, pairs):
    from typer.testing import CliRunner

    from tunelab.cli import app

    config = tmp_path / "dpo.yaml"
    config.write_text(f"recipe: dpo\nmodel: {tiny_llama}\ndata: {{train: {pairs['train']}}}\n")
    result = CliRunner().invoke(app, ["data", "inspect", str(config), "--example", "2"])
    assert result.exit_code == 0, result.output
    assert "chosen (" in result.output and "rejected (" in result.output and "thanks" in result.output
    assert "15 pairs (1 held out)" in result.output


def test_a_reused_untuned_evaluation_does_not_read_pairs_as_instruction_data(dpo_config):
    first = dpo.main(dpo_config("train.max_steps=1", output="first")).run_dir
    again = dpo.main(dpo_config("train.max_steps=1", f"eval.before_from={first / 'eval_before.json'}", output="again"))
    assert again.steps == 1  # it used to fail: eval.before_from was checked against data.train read as SFT examples
