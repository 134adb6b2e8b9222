"""The shop tool-call example task: deterministic balanced splits, canonical calls, held-out entities, committed JSONL, preset."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from tunelab.resolve import load_config
from tunelab.data import load_examples
from tunelab.evaluation.metrics import score
from tunelab.examples.toolcall import task

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs/smollm2-135m-instruct/sft_lora_toolcall.yaml"

CALL = re.compile(r"(\w+)\((.*)\)")
ARG = re.compile(r'(\w+)=("[^"]*"|\d+(?:\.\d+)?)(?:, |$)')
NUMBER = {"amount": re.compile(r"\d+\.\d\d"), "max_price": re.compile(r"[1-9]\d*")}
ORDER_ID = re.compile(r"B-\d{4}")


def parse_call(answer: str) -> tuple[str, list[tuple[str, str]]]:
    """(tool, [(argument, value as written), ...]) of a canonical call; AssertionError if it is not one."""
    match = CALL.fullmatch(answer)
    assert match and "\n" not in answer, answer
    args = ARG.findall(match.group(2))
    assert ", ".join(f"{k}={v}" for k, v in args) == match.group(2), answer  # nothing left over
    return match.group(1), args


@pytest.fixture(scope="module")
def splits():
    return task.make_splits()


def _text(record: dict) -> str:
    return "\n".join(m["content"] for m in record["messages"])


def test_sizes_shape_and_determinism(splits):
    train, test = splits
    assert (len(train), len(test)) == (300, 60)
    for record in train + test:
        assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
        assert record["messages"][0]["content"] == task.SYSTEM_PROMPT
    assert task.make_splits() == splits
    assert task.make_splits(seed=1) != splits
    small_train, small_test = task.make_splits(n_train=23, n_test=7, seed=3)
    assert (len(small_train), len(small_test)) == (23, 7)


def test_tools_are_balanced(splits):
    for records in splits:
        counts = Counter(parse_call(task.call_of(r))[0] for r in records)
        assert set(counts) == set(task.TOOLS)
        assert all(c in (len(records) // 6, len(records) // 6 + 1) for c in counts.values()), counts


def test_every_answer_is_one_canonical_call_of_a_listed_tool(splits):
    for record in splits[0] + splits[1]:
        answer, request = task.call_of(record), record["messages"][1]["content"]
        tool, args = parse_call(answer)
        assert [k for k, _ in args] == [arg for arg, _ in task.TOOLS[tool]], answer
        for (name, value), (_, kind) in zip(args, task.TOOLS[tool]):
            if kind == "number":
                assert NUMBER[name].fullmatch(value), answer
                assert value in request, (request, answer)
            elif name == "reason":
                assert value.strip('"') in task.REASONS, answer
            else:
                assert value.startswith('"') and value.strip('"') in request, (request, answer)
    assert all(tool in task.SYSTEM_PROMPT for tool in task.TOOLS)
    assert all(reason in task.SYSTEM_PROMPT for reason in task.REASONS)
    answers = [task.call_of(r) for r in splits[0]]
    assert score("exact_match", answers, answers).score == 1.0


def test_format_call():
    assert task.format_call("refund", {"order_id": "B-4821", "amount": "19.99"}) == 'refund(order_id="B-4821", amount=19.99)'
    assert task.format_call("find_product", {"max_price": 40, "name": "desk lamp"}) == 'find_product(name="desk lamp", max_price=40)'


def test_hard_cases_are_present(splits):
    train, test = splits
    for records, expected in ((train, {"get_order_status", "cancel_order", "refund", "change_address"}),
                              (test, {"get_order_status", "refund", "change_address"})):
        two_orders = [r for r in records if len(set(ORDER_ID.findall(r["messages"][1]["content"]))) == 2]
        assert expected <= {parse_call(task.call_of(r))[0] for r in two_orders}
        assert len(two_orders) >= len(records) // 12
    # an order id beside the tracking number: track_parcel takes the tracking number
    assert any(ORDER_ID.search(r["messages"][1]["content"]) for r in test if task.call_of(r).startswith("track_parcel"))
    misleading = [r for r in train if "cancel" in r["messages"][1]["content"].lower()
                  and not task.call_of(r).startswith("cancel_order")]
    assert {parse_call(task.call_of(r))[0] for r in misleading} >= {"change_address", "refund", "track_parcel"}


def test_records_are_distinct_within_each_split(splits):
    for records in splits:
        assert len({r["messages"][1]["content"] for r in records}) == len(records)


def test_entity_pools_are_disjoint():
    pools = task.value_pools()
    assert all(pool["train"] and pool["test"] for pool in pools.values())
    assert not set(pools["price"]["train"]) & set(pools["price"]["test"])
    strings = {slot: pool for slot, pool in pools.items() if slot != "price"}
    train = [v.lower() for pool in strings.values() for v in pool["train"]]
    test = [v.lower() for pool in strings.values() for v in pool["test"]]
    assert not [(a, b) for a in train for b in test if a in b or b in a]
    assert task.test_only_values() == {v for pool in strings.values() for v in pool["test"]}


def test_no_test_value_in_training_text(splits):
    train, test = splits
    train_text = "\n".join(_text(r) for r in train).lower()
    assert not {v for v in task.test_only_values() if v.lower() in train_text}
    held_out = task.test_only_values() | {str(p) for p in task.value_pools()["price"]["test"]}
    for record in test:  # and every held-out answer's entity arguments are held-out values
        _, args = parse_call(task.call_of(record))
        values = {v.strip('"') for k, v in args if k != "reason"}
        assert values <= held_out, task.call_of(record)


def test_records_validate_through_load_examples(tmp_path):
    train_path, test_path = task.write_splits(tmp_path, n_train=20, n_test=10, seed=5)
    examples = load_examples([str(task.HERE / "train.jsonl"), str(task.HERE / "test.jsonl"), str(train_path), str(test_path)])
    assert len(examples) == 390
    assert all(len(e.messages) == 3 for e in examples)


def test_committed_jsonl_equals_fresh_splits(splits):
    for name, rows in zip(("train.jsonl", "test.jsonl"), splits):
        lines = (task.HERE / name).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == rows, f"{name} is stale: python -m tunelab.examples.toolcall.task"


def test_write_splits(tmp_path):
    paths = task.write_splits(tmp_path, n_train=20, n_test=10, seed=5)
    assert [p.name for p in paths] == ["train.jsonl", "test.jsonl"]
    written = [[json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()] for p in paths]
    assert tuple(written) == task.make_splits(20, 10, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.jsonl", "train.jsonl"]  # no temp files left


def test_too_few_examples_is_an_error():
    with pytest.raises(ValueError):
        task.make_splits(n_train=5)


def test_the_preset_loads(monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_config(PRESET)
    assert config.method.name == "lora" and config.data.max_length == 256
    assert config.eval.metric == "exact_match" and config.eval.max_new_tokens == 48
    assert config.data.eval_files()
    # the held-out check of the data-chosen defaults: the preset sets none of them
    assert config.train.defaults == "data"
    assert not {"epochs", "lr", "batch_size", "warmup_ratio"} & config.train.given()
