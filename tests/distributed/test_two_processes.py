"""``tunelab train --nproc 2`` on this CPU (two gloo processes under torchrun) against one process at the same
global batch: the same losses and adapter (DDP and FSDP), SIGKILL + ``--resume`` bit-identical to an
uninterrupted two-process run, a failing rank ending the job with its error, and every recipe running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import chat_records, write_jsonl

REPO = Path(__file__).resolve().parents[2]
# 22 examples in micro-batches of 2 = 11 a epoch; 4 a step over both ranks: 3 steps an epoch, the third with 3
# micro-batches, so one rank runs a filler there.
TRAIN = "train: {batch_size: 2, grad_accum: 2, lr: 1.0e-2, epochs: 2, warmup_ratio: 0, save_every: 2, seed: 1}"


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_llama) -> Path:
    folder = tmp_path_factory.mktemp("two-processes")
    write_jsonl(folder / "train.jsonl", chat_records(22))
    write_jsonl(folder / "eval.jsonl", chat_records(5, seed=3))
    (folder / "sft.yaml").write_text(f"model: {tiny_llama}\ndata: {{train: {folder / 'train.jsonl'}, eval: {folder / 'eval.jsonl'}}}\n"
                                     f"method: {{name: lora, r: 4}}\n{TRAIN}\neval: {{probe: false}}\n")
    return folder


def train(config: Path, *args: str, nproc: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tunelab", "train", str(config), *args, *(["--nproc", str(nproc)] if nproc > 1 else [])]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})})


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def single(work) -> Path:
    """One process with the two-process global batch (grad_accum 2 × 2 processes = 4)."""
    done = train(work / "sft.yaml", f"output_dir={work / 'single'}", "train.grad_accum=4")
    assert done.returncode == 0, done.stderr[-3000:]
    return work / "single"


@pytest.fixture(scope="module")
def two(work):
    """Uninterrupted two-process runs, by strategy."""
    runs = {}

    def run(strategy: str) -> Path:
        if strategy not in runs:
            out = work / f"two-{strategy}"
            done = train(work / "sft.yaml", f"output_dir={out}", f"distributed.strategy={strategy}", nproc=2)
            assert done.returncode == 0, done.stderr[-3000:]
            runs[strategy] = out
        return runs[strategy]
    return run


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_as_one_at_the_same_global_batch(single, two, strategy):
    run = two(strategy)
    assert losses(run) == pytest.approx(losses(single), rel=1e-5) and len(losses(run)) == 6
    one, both = adapter(single), adapter(run)
    assert set(one) == set(both)
    assert all(torch.allclose(one[k], both[k], atol=1e-5) for k in one)  # the single-process format, loadable anywhere
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["processes"] == 2 and manifest["distributed_strategy"] == strategy
    assert (run / "eval.json").is_file() and len(list((run / "checkpoints").iterdir())) == 2  # rank 0 wrote, once


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sigkill_and_resume_on_two_processes_is_bit_identical(work, two, strategy):
    out = work / f"killed-{strategy}"
    common = (f"output_dir={out}", f"distributed.strategy={strategy}")
    crashed = train(work / "sft.yaml", *common, nproc=2, env={"TUNELAB_TEST_SIGKILL_AT_STEP": "4"})
    assert crashed.returncode != 0 and not (out / "adapter").exists()
    refused = train(work / "sft.yaml", *common, "--resume")  # one process: the global batch would change
    assert refused.returncode == 2 and "--nproc 2" in refused.stderr
    resumed = train(work / "sft.yaml", *common, "--resume", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr and "(step 4)" in resumed.stderr
    uninterrupted, again = adapter(two(strategy)), adapter(out)
    assert all(torch.equal(uninterrupted[k], again[k]) for k in uninterrupted)
    assert losses(out) == losses(two(strategy))


def test_a_failing_rank_stops_the_job_with_its_error(work):
    failed = train(work / "sft.yaml", f"output_dir={work / 'failing'}", nproc=2, env={"TUNELAB_TEST_FAIL_AT_STEP": "1:2"})
    assert failed.returncode == 2
    assert "rank 1: failing on purpose after step 2" in failed.stderr
    assert "training on 2 processes failed" in failed.stderr


def _recipe_configs(work: Path, tiny: Path) -> dict[str, str]:
    pairs = [{"prompt": f"Colour {i}?", "chosen": f"It is red {i}, thanks.", "rejected": f"It is red {i}!"} for i in range(12)]
    write_jsonl(work / "pairs.jsonl", pairs)
    write_jsonl(work / "prompts.jsonl", [{"prompt": f"Colour {i}?", "answer": "red"} for i in range(8)])
    (work / "docs").mkdir(exist_ok=True)
    (work / "docs" / "a.txt").write_text("The red fox jumps over the blue dog. " * 40, encoding="utf-8")
    short = "train: {batch_size: 2, max_steps: 3, lr: 1.0e-2, warmup_ratio: 0}\neval: {probe: false, before: false}\n"
    head = f"model: {tiny}\nmethod: {{name: lora, r: 4}}\n{short}"
    return {
        "pretrain": f"{head}recipe: pretrain\ndata: {{train: {work / 'docs'}}}\n",
        "dpo": f"{head}recipe: dpo\ndata: {{train: {work / 'pairs.jsonl'}}}\n",
        "reward": f"{head}recipe: reward\ndata: {{train: {work / 'pairs.jsonl'}}}\n",
        "distill": f"{head}recipe: {{name: distill, teacher: {tiny}}}\ndata: {{train: {work / 'train.jsonl'}}}\n",
        "grpo": f"{head}recipe: {{name: grpo, num_generations: 2, max_completion_length: 6, rewards: [{{fn: exact_match}}]}}\n"
                f"data: {{train: {work / 'prompts.jsonl'}}}\n",
    }


@pytest.mark.parametrize("recipe", ["pretrain", "dpo", "reward", "distill", "grpo"])
def test_every_recipe_runs_on_two_processes(work, tiny_llama, recipe):
    config = work / f"{recipe}.yaml"
    config.write_text(_recipe_configs(work, tiny_llama)[recipe] + f"output_dir: {work / ('recipe-' + recipe)}\n")
    done = train(config, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((work / f"recipe-{recipe}" / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["processes"] == 2 and manifest["steps_done"] == 3
