"""Training data made by the embedded model (minutes on 2 CPU cores): its answers to SQL questions as SFT data that
tokenizes for training, and preference pairs from the mistakes of a short SQL run, scored by execution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.resolve import load_config
from tunelab.data import load_examples, tokenize_examples
from tunelab.data.preferences import load_preferences, tokenize_preferences
from tunelab.recipes import sft

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SQL = REPO / "src/tunelab/examples/sql"
MODEL = "smollm2-135m-instruct"


def _first_lines(source: Path, target: Path, n: int) -> Path:
    target.write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return target


def test_embedded_model_answers_become_sft_data_that_trains(tmp_path):
    from tunelab.evaluation.run import load_for_eval
    from tunelab.models.load import resolve_model_path

    prompts, out = _first_lines(SQL / "train.jsonl", tmp_path / "prompts.jsonl", 4), tmp_path / "distill.jsonl"
    result = CliRunner().invoke(app, ["data", "generate", "--model", MODEL, "--prompts", str(prompts), "--out", str(out),
                                      "--max-new-tokens", "64", "--keep-truncated"])
    assert result.exit_code == 0, result.output
    examples = load_examples([str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(examples) == len(records) >= 3  # an empty answer would be left out; the instruct model answers
    references = [json.loads(line)["messages"][-1]["content"] for line in prompts.read_text().splitlines()]
    assert not any(r["messages"][-1]["content"] in references for r in records)  # the file's answers are not copied
    assert all(r["meta"]["teacher"]["resolved"] == str(Path(resolve_model_path(MODEL)).resolve()) for r in records)
    assert records[0]["meta"]["source"] == f"{prompts}:1" and records[0]["meta"]["decoding"]["max_new_tokens"] == 64
    tokenizer = load_for_eval(MODEL).tokenizer
    tokenized, stats = tokenize_examples(examples, tokenizer, loss_on="assistant", max_length=512)
    assert len(tokenized) == len(examples) and all(any(label != -100 for label in t.labels) for t in tokenized)


def test_pairs_from_a_short_sql_runs_mistakes(tmp_path, monkeypatch):
    from tunelab.examples.sql.task import build_database

    monkeypatch.chdir(REPO)
    db = build_database(tmp_path / "shop.sqlite")
    cfg = load_config(REPO / "configs/smollm2-135m-instruct/sft_lora_sql.yaml", [
        f"output_dir={tmp_path / 'run'}", f"eval.db={db}", "train.max_steps=6", "train.defaults=fixed", "train.lr=1e-3",
        "eval.before=false", "eval.few_shot=0",
        "eval.probe=false", "eval.limit=2"])
    run = sft.main(cfg).run_dir
    refused = CliRunner().invoke(app, ["data", "preferences", "--model", str(run), "--data", str(SQL / "test.jsonl"),
                                       "--out", str(tmp_path / "leak.jsonl")])
    assert refused.exit_code == 2 and "evaluation split" in refused.output
    data, out = _first_lines(SQL / "train.jsonl", tmp_path / "train16.jsonl", 16), tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(app, ["data", "preferences", "--model", str(run), "--data", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "pairs.summary.json").read_text())
    assert summary["metric"] == "sql_exec" and summary["n_examples"] == 16  # the run's metric and db by default
    assert summary["n_pairs"] + len(summary["skipped"]) == summary["n_wrong"] > 0  # six steps leave mistakes
    pairs = load_preferences([str(out)])
    assert len(pairs) == summary["n_pairs"] and all(p.chosen.strip() != p.rejected.strip() for p in pairs)
    from tunelab.evaluation.run import load_for_eval

    tokenized, _ = tokenize_preferences(pairs, load_for_eval(str(run)).tokenizer, max_length=256)
    assert len(tokenized) == len(pairs)
