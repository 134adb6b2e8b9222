"""The structured-extraction example task: deterministic splits, held-out entities, answers the metric can score."""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.resolve import load_config
from tunelab.data import load_examples
from tunelab.evaluation.metrics import score
from tunelab.examples.extraction.task import FIELDS, HERE, make_splits, test_only_values, write_splits

REPO = Path(__file__).resolve().parents[2]


def test_splits_are_deterministic_and_the_committed_files_are_them(tmp_path):
    train, test = make_splits()
    assert (train, test) == make_splits() and len(train) == 300 and len(test) == 60
    for name, rows in (("train", train), ("test", test)):
        committed = [json.loads(line) for line in (HERE / f"{name}.jsonl").read_text().splitlines()]
        assert committed == rows, f"{name}.jsonl drifted: python -m tunelab.examples.extraction.task"
    written = write_splits(tmp_path, 20, 5)
    assert [len(p.read_text().splitlines()) for p in written] == [20, 5]


def test_no_held_out_entity_occurs_in_training():
    train, test = make_splits()
    train_text = " ".join(m["content"] for r in train for m in r["messages"])
    assert not {v for v in test_only_values() if v in train_text}
    for record in test:  # and every held-out answer uses held-out entities only
        answer = json.loads(record["messages"][-1]["content"])
        assert {answer["city"], answer["product"], *answer["customer"].split()} <= test_only_values()


def test_answers_are_json_objects_the_metric_scores_and_records_validate():
    train, test = make_splits()
    answers = [r["messages"][-1]["content"] for r in train + test]
    assert all(tuple(json.loads(a)) == FIELDS for a in answers)
    assert score("json_fields", answers, answers).score == 1.0
    examples = load_examples([str(HERE / "train.jsonl"), str(HERE / "test.jsonl")])
    assert len(examples) == 360
    assert sum(json.loads(a)["express"] for a in answers) in range(140, 221)  # both values well represented


def test_the_preset_loads(monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_config(REPO / "configs/smollm2-135m-instruct/sft_lora_extract.yaml")
    assert config.eval.metric == "json_fields" and config.data.eval_files()
