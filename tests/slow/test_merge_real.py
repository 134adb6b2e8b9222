"""Merging and blending on the embedded SmolLM2: a TIES merge of a SQL and a reviews fine-tune scored on both tasks,
and the interpolation table of one run (t=0 the untuned model, t=1 the run's own score). Minutes on 2 CPU cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunelab.resolve import load_config
from tunelab.merging import interpolate_run, load_merge_spec, merge_models
from tunelab.recipes import sft

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs/smollm2-135m-instruct"
SHORT = ["train.defaults=fixed", "train.max_steps=8", "train.lr=1e-3", "train.warmup_ratio=0", "train.save_every=null", "train.eval_every=null",
         "eval.limit=6", "eval.few_shot=0", "eval.batch_size=16"]
PROBE = 12


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import os

    folder = tmp_path_factory.mktemp("merge-real")
    previous = os.getcwd()
    os.chdir(REPO)  # the presets' data paths are relative to the repository
    from tunelab.examples.sql.task import build_database

    db = build_database(str(folder / "shop.sqlite"))  # a fresh clone has no runs/shop.sqlite
    probe = folder / "probe.jsonl"  # the built-in probe's first PROBE items: each scored model asks them
    probe.write_text("\n".join((REPO / "src/tunelab/evaluation/probes/general.jsonl").read_text().splitlines()[:PROBE]) + "\n")
    try:
        sql = sft.main(load_config(CONFIGS / "sft_lora_sql.yaml", [f"output_dir={folder / 'sql'}", f"eval.probe={probe}",
                                                                   f"eval.db={db}", *SHORT])).run_dir
        reviews = sft.main(load_config(CONFIGS / "sft_lora.yaml", [f"output_dir={folder / 'reviews'}", "eval.probe=false", *SHORT])).run_dir
    finally:
        os.chdir(previous)
    return folder, sql, reviews


def test_ties_merge_of_two_real_fine_tunes_scores_both_tasks(runs):
    folder, sql, reviews = runs
    spec = folder / "merge.yaml"
    spec.write_text(yaml.safe_dump({"merge": {"method": "ties", "base": "smollm2-135m-instruct", "models": [
        {"path": str(sql), "density": 0.5}, {"path": str(reviews), "density": 0.5}]}}))
    report = merge_models(load_merge_spec(spec), folder / "ties", prompts=2)
    rows = {r["model"]: r for r in report["scores"]}
    assert set(rows) == {"base", "sql", "reviews", "merged"} and report["verification"]["passed"]
    for run in (sql, reviews):
        assert rows[run.name]["tasks"][run.name]["score"] == json.loads((run / "eval.json").read_text())["tuned"]["score"]
    assert rows["merged"]["probe"]["items"] == PROBE and not report["warnings"]


def test_interpolation_of_a_real_run_runs_from_the_base_to_the_run(runs):
    folder, sql, _ = runs
    recorded = json.loads((sql / "eval.json").read_text())
    report = interpolate_run(sql, [0.5, 1.0], folder / "blend", pick="best-retention", prompts=2)
    base, _, tuned = report["table"]
    assert base["task_score"] == recorded["baselines"]["zero_shot"]["score"] and base["retention"] == 1.0
    assert tuned["task_score"] == recorded["tuned"]["score"] and tuned["retention"] == recorded["forgetting"]["retention"]
    assert report["verification"]["passed"]
