"""The benchmark scripts a GPU session will run (bench/device/README.md) stay runnable: each is run here
on CPU at a toy size, as a subprocess, and its JSON output checked.

Slow: they load the embedded model's tokenizer (and, for anchor_sql.py, the model itself).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _run(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_serving_bench_measures_both_batching_modes_against_one_at_a_time(tmp_path):
    report = json.loads(_run(str(REPO / "bench/bench_serving.py"), "--model", "tiny", "--requests", "4", "--max-tokens", "8",
                             cwd=tmp_path))
    assert set(report["served"]) == {"continuous", "continuous-unmixed", "dynamic"} and report["sequential"]["tokens"] > 0
    assert all(s["tokens"] == report["sequential"]["tokens"] for s in report["served"].values())  # greedy: the same answers


def test_side_by_side_shape_job_runs_both_loops_on_the_same_data(tmp_path):
    """--shape: a random-weight model of the named shape, rows of --max-length tokens, loss everywhere; the
    plain loop and tunelab start from the same loss (same model, same tokens)."""
    out = tmp_path / "sbs.json"
    _run(str(REPO / "bench/side_by_side.py"), "--shape", "tiny-llama", "--examples", "4", "--steps", "2",
         "--batch-size", "2", "--max-length", "64", "--runners", "a,c", "--workdir", str(tmp_path / "work"),
         "--out", str(out), cwd=tmp_path)
    report = json.loads(out.read_text())
    assert report["data"]["mean_tokens"] == 64 and report["data"]["padding_fraction"] == 0
    plain, tunelab = report["results"]
    assert plain["runner"] == "a" and tunelab["runner"] == "c"
    assert plain["tokens_per_s"] > 0 and tunelab["tokens_per_s"] > 0 and tunelab["peak_memory_mib"] > 0
    assert plain["losses"][0] == pytest.approx(tunelab["losses"][0], rel=1e-4)


def test_anchor_sql_trains_and_scores_through_tunelab_train(tmp_path):
    out = tmp_path / "anchor"
    _run(str(REPO / "bench/anchor_sql.py"), "--train", "16", "--test", "16", "--out", str(out),
         "train.max_steps=1", "train.batch_size=4", "eval.probe=false", "eval.max_new_tokens=8", cwd=tmp_path)
    summary = json.loads((out / "anchor_summary.json").read_text())
    assert summary["steps"] == 1 and summary["train_seconds"] > 0 and summary["device"] == "cpu"
    assert 0.0 <= summary["execution_accuracy"] <= 1.0
    test = [json.loads(line) for line in (tmp_path / "anchor-data" / "test.jsonl").read_text().splitlines()]
    assert len(test) == 16 and all("CREATE TABLE" in r["messages"][0]["content"] for r in test)


def test_grpo_sampling_bench_counts_every_completion_of_each_way(tmp_path):
    out = tmp_path / "grpo.json"
    _run(str(REPO / "bench/bench_grpo_sampling.py"), "--model", "tiny", "--prompts", "2", "--group", "3",
         "--max-new-tokens", "4", "--out", str(out), cwd=tmp_path)
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"one_at_a_time", "hf_grouped", "tunelab"}
    assert all(r["completions"] == 6 and 0 < r["tokens"] <= 24 and r["completions_per_s"] > 0 for r in results.values())


def test_grpo_step_bench_times_both_trainers_on_the_same_job(tmp_path):
    out = tmp_path / "step.json"
    _run(str(REPO / "bench/bench_grpo_step.py"), "--model", "tiny", "--steps", "2", "--prompts", "2", "--group", "2",
         "--max-new-tokens", "4", "--out", str(out), cwd=tmp_path)
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"tunelab", "trl"}  # TRL is a test dependency
    assert all(len(r["step_seconds"]) == 2 and r["mean_step_after_first"] > 0 for r in results.values())
