"""The text-to-SQL example task (database, splits, committed JSONL) and the general-skills probe file."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from tunelab.examples.sql import task

SQL_DIR = Path(task.__file__).parent
PROBES = Path(task.__file__).parents[2] / "evaluation" / "probes" / "general.jsonl"


@pytest.fixture(scope="module")
def splits():
    return task.make_splits()


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return task.build_database(tmp_path_factory.mktemp("sql") / "shop.db")


def _dump(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def _text(record: dict) -> str:
    return record["messages"][1]["content"] + "\n" + record["messages"][2]["content"]


# -------------------------------------------------------------------------------------- database


def test_build_database_is_deterministic_and_overwrites(tmp_path, db):
    again = task.build_database(tmp_path / "shop.db")
    assert _dump(again) == _dump(db)
    task.build_database(again)  # overwrite in place
    assert _dump(again) == _dump(db)
    assert [p.name for p in tmp_path.iterdir()] == ["shop.db"]  # no temp file left behind
    conn = sqlite3.connect(db)
    try:
        counts = [conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("products", "customers", "orders")]
        assert counts == [30, 20, 200]
        n_prices = conn.execute("SELECT COUNT(DISTINCT price) FROM products").fetchone()[0]
        assert n_prices == 30  # no ties under ORDER BY price
    finally:
        conn.close()


def test_every_gold_sql_executes_with_rows(splits, db):
    conn = sqlite3.connect(db)
    try:
        for record in splits[0] + splits[1]:
            sql = record["messages"][2]["content"]
            assert not sql.rstrip().endswith(";")
            rows = conn.execute(sql).fetchall()
            assert rows and any(v is not None for row in rows for v in row), sql
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------- splits


def test_sizes_format_and_determinism(splits):
    train, test = splits
    assert (len(train), len(test)) == (240, 40)
    for record in train + test:
        roles = [m["role"] for m in record["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert record["messages"][0]["content"] == task.SYSTEM_PROMPT
    assert task.make_splits() == splits
    assert task.make_splits(seed=1) != splits
    small_train, small_test = task.make_splits(n_train=50, n_test=20, seed=3)
    assert (len(small_train), len(small_test)) == (50, 20)


def test_every_intent_in_both_splits(splits):
    for split in splits:
        intents = {task.intent_of(r["messages"][2]["content"]) for r in split}
        assert intents == set(task.INTENTS)


def test_each_gold_sql_matches_exactly_one_intent(splits):
    for record in splits[0] + splits[1]:
        sql = record["messages"][2]["content"]
        matching = [name for name, (_, _, t) in task.INTENTS.items()
                    if re.fullmatch(re.sub(r"\\\{[a-z_]+\\\}", "[^']+", re.escape(t)), sql)]
        assert len(matching) == 1, (sql, matching)


def test_value_pools_are_disjoint():
    pools = task.value_pools()
    train_values = {str(v) for pool in pools.values() for v in pool["train"]}
    assert not train_values & task.test_only_values()
    assert "1" not in task.test_only_values()  # LIMIT 1 appears in training SQL


def test_no_test_value_in_training_examples(splits):
    train, test = splits
    train_text = "\n".join(_text(r) for r in train).lower()
    for value in task.test_only_values():
        assert not re.search(rf"(?<![\w.]){re.escape(value.lower())}(?![\w.])", train_text), value
    # and the test split does use them: every test example holds at least one test-only value
    for record in test:
        text = _text(record).lower()
        assert any(re.search(rf"(?<![\w.]){re.escape(v.lower())}(?![\w.])", text) for v in task.test_only_values())


def test_committed_jsonl_equals_fresh_splits(splits):
    for name, rows in zip(("train.jsonl", "test.jsonl"), splits):
        lines = (SQL_DIR / name).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == rows, f"{name} is stale: python -m tunelab.examples.sql.task"


def test_write_splits(tmp_path):
    train_path, test_path, orders_train, orders_test = task.write_splits(tmp_path, n_train=20, n_test=16, seed=5)
    train, test = task.make_splits(20, 16, 5)
    assert [json.loads(x) for x in train_path.read_text(encoding="utf-8").splitlines()] == train
    assert [json.loads(x) for x in test_path.read_text(encoding="utf-8").splitlines()] == test
    subset = [json.loads(x) for x in orders_train.read_text(encoding="utf-8").splitlines()]
    assert subset == [r for r in train if task.about_orders(r)] and subset
    assert all("orders" in r["messages"][-1]["content"] for r in subset)
    assert [json.loads(x) for x in orders_test.read_text(encoding="utf-8").splitlines()] == [r for r in test if task.about_orders(r)]


def test_the_shipped_orders_split_is_the_shipped_splits_subset():
    here = Path(task.__file__).parent
    for split in ("train", "test"):
        whole = [json.loads(x) for x in (here / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        orders = [json.loads(x) for x in (here / f"orders_{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        assert orders == [r for r in whole if task.about_orders(r)]


def test_too_few_examples_is_an_error():
    with pytest.raises(ValueError):
        task.make_splits(n_train=3)


# ---------------------------------------------------------------------------------------- probes


def test_probe_file():
    items = [json.loads(line) for line in PROBES.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert 30 <= len(items) <= 60
    ids = [it["id"] for it in items]
    assert len(ids) == len(set(ids))
    skills = {"fact", "arithmetic", "instruction", "language"}
    for it in items:
        assert set(it) == {"id", "skill", "question", "answers"}, it
        assert it["skill"] in skills, it
        assert it["question"].strip(), it
        assert it["answers"] and all(isinstance(a, str) and a.strip() and a == a.lower() for a in it["answers"]), it
    assert {it["skill"] for it in items} == skills


def test_the_shipped_agent_conversations_are_fresh_and_load_as_tool_chats(tmp_path):
    """agent_train.jsonl: every question of train.jsonl, answered at once, after querying the gold query, or after
    a query one column off and its error; the committed file and tools equal a fresh generation, and load."""
    from tunelab.data import load_examples
    from tunelab.examples.sql import agent

    data, tools = agent.write_agent_data(tmp_path)
    assert data.read_text() == (agent.HERE / "agent_train.jsonl").read_text()
    assert tools.read_text() == (agent.HERE / "agent_train.tools.json").read_text()
    examples = load_examples([str(agent.HERE / "agent_train.jsonl")])
    assert len(examples) == 240 and all(e.tools and e.tools[0]["function"]["name"] == "run_sql" for e in examples)
    calls = [e.messages[-3:] for e in examples if any(m.get("tool_calls") for m in e.messages)]
    fixed = [c for c in calls if c[1]["content"].startswith("error:")]
    assert 60 < len(fixed) < 100 and 60 < len(calls) - len(fixed) < 100  # about a third each
    for call, result, answer in calls:
        query = call["tool_calls"][0]["function"]["arguments"]["query"]
        assert (query != answer["content"] and "no such column" in result["content"]) if result in [c[1] for c in fixed] \
            else (query == answer["content"] and result["content"])


def test_a_broken_query_is_one_column_off():
    from tunelab.examples.sql.agent import broken

    assert broken("SELECT COUNT(*) FROM orders WHERE day = 'Monday'") == "SELECT COUNT(*) FROM orders WHERE date = 'Monday'"
    assert broken("SELECT COUNT(*) FROM orders") is None
