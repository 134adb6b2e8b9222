"""The support-ticket triage example task: deterministic balanced splits, held-out entities, committed JSONL, preset."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tunelab.resolve import load_config
from tunelab.data import load_examples
from tunelab.examples.triage import task

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs/smollm2-135m-instruct/sft_lora_triage.yaml"


@pytest.fixture(scope="module")
def splits():
    return task.make_splits()


def _text(record: dict) -> str:
    return "\n".join(m["content"] for m in record["messages"])


def test_sizes_shape_and_determinism(splits):
    train, test = splits
    assert (len(train), len(test)) == (300, 60)
    for record in train + test:
        assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant", "user", "assistant"]
        assert record["messages"][0]["content"] == task.SYSTEM_PROMPT
    assert task.make_splits() == splits
    assert task.make_splits(seed=1) != splits
    small_train, small_test = task.make_splits(n_train=23, n_test=7, seed=3)
    assert (len(small_train), len(small_test)) == (23, 7)


def test_classes_are_balanced(splits):
    for records in splits:
        counts = Counter(task.label_of(r) for r in records)
        assert set(counts) == set(task.LABELS)
        assert all(abs(c - len(records) / 5) <= 2 for c in counts.values()), counts


def test_final_turn_is_exactly_one_label(splits):
    for record in splits[0] + splits[1]:
        assert record["messages"][-1]["role"] == "assistant"
        assert record["messages"][-1]["content"] in task.LABELS
    assert all(label in task.SYSTEM_PROMPT for label in task.LABELS)


def test_records_are_distinct_within_each_split(splits):
    for records in splits:
        assert len({json.dumps(r) for r in records}) == len(records)


def test_entity_pools_are_disjoint():
    pools = task.value_pools()
    train = [v.lower() for pool in pools.values() for v in pool["train"]]
    test = [v.lower() for pool in pools.values() for v in pool["test"]]
    assert all(pool["train"] and pool["test"] for pool in pools.values())
    assert not [(a, b) for a in train for b in test if a in b or b in a]
    assert task.test_only_values() == {v for pool in pools.values() for v in pool["test"]}


def test_no_test_value_in_training_text(splits):
    train, test = splits
    train_text = "\n".join(_text(r) for r in train).lower()
    assert not {v for v in task.test_only_values() if v.lower() in train_text}
    for record in test:  # and the test split does use them: every test chat names a held-out entity
        assert any(v in _text(record) for v in task.test_only_values()), _text(record)


def test_records_validate_through_load_examples(tmp_path):
    train_path, test_path = task.write_splits(tmp_path, n_train=20, n_test=10, seed=5)
    examples = load_examples([str(task.HERE / "train.jsonl"), str(task.HERE / "test.jsonl"), str(train_path), str(test_path)])
    assert len(examples) == 390
    assert all(len(e.messages) == 5 for e in examples)


def test_committed_jsonl_equals_fresh_splits(splits):
    for name, rows in zip(("train.jsonl", "test.jsonl"), splits):
        lines = (task.HERE / name).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == rows, f"{name} is stale: python -m tunelab.examples.triage.task"


def test_write_splits(tmp_path):
    paths = task.write_splits(tmp_path, n_train=20, n_test=10, seed=5)
    assert [p.name for p in paths] == ["train.jsonl", "test.jsonl"]
    written = [[json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()] for p in paths]
    assert tuple(written) == task.make_splits(20, 10, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.jsonl", "train.jsonl"]  # no temp files left


def test_too_few_examples_is_an_error():
    with pytest.raises(ValueError):
        task.make_splits(n_train=3)


def test_the_preset_loads(monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_config(PRESET)
    assert config.eval.metric == "accuracy" and config.eval.max_new_tokens == 4
    assert config.model_dump()["eval"]["labels"] == list(task.LABELS)
    assert config.data.eval_files()
