"""GRPO reward functions: each built-in on hand-made cases, user functions from a module, the registry and spec
errors, and every violation of the contract stopping with the function's name and the example."""

from __future__ import annotations

import json
import math
import sqlite3
import sys

import numpy as np
import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.registry import Registry
from tunelab.rewards import builtins, catalog
from tunelab.rewards.functions import RewardSet, load_reward, register_reward, reward_names


def _scores(spec: dict, completions: list[str], prompts: list | None = None, **fields) -> list[float]:
    prompts = prompts if prompts is not None else ["q"] * len(completions)
    return RewardSet([spec]).check(completions, prompts, fields)[spec["fn"]]


@pytest.fixture
def shop_db(tmp_path):
    path = tmp_path / "shop.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE items (id INTEGER, name TEXT, price REAL)")
        conn.executemany("INSERT INTO items VALUES (?, ?, ?)", [(1, "pen", 2.5), (2, "book", 12.0), (3, "bag", 30.0)])
    return path


# ---- built-ins ----

def test_builtin_names():
    assert {"sql_exec", "exact_match", "json_valid", "json_schema", "regex", "length_penalty", "reward_model"} <= set(reward_names())


def test_sql_exec_rewards_the_same_result_set(shop_db, tmp_path):
    gold = "SELECT name FROM items WHERE price < 20"
    completions = ["SELECT name FROM items WHERE price <= 12",  # other SQL, same rows
                   "```sql\nSELECT name FROM items WHERE price < 20 ORDER BY name;\n```",  # fenced, order free
                   "SELECT name FROM items",  # one row too many
                   "SELECT nme FROM items",  # fails to run
                   "DELETE FROM items", ""]
    assert _scores({"fn": "sql_exec", "db": str(shop_db)}, completions, answer=[gold] * 6) == [1, 1, 0, 0, 0, 0]
    assert sqlite3.connect(shop_db).execute("SELECT COUNT(*) FROM items").fetchone() == (3,)  # read-only
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE items (id INTEGER, name TEXT, price REAL)")
        conn.execute("INSERT INTO items VALUES (9, 'pen', 1.0)")
    query = "SELECT COUNT(*) FROM items"
    per_record = _scores({"fn": "sql_exec", "reference": "sql"}, ["SELECT 3", "SELECT 3", "SELECT 1"],
                         sql=[query] * 3, db=[str(shop_db), str(other), str(other)])
    assert per_record == [1, 0, 1]  # each record on its own database


def test_sql_exec_errors_name_the_fix(shop_db, tmp_path):
    with pytest.raises(TunelabError, match="needs a database"):
        _scores({"fn": "sql_exec"}, ["SELECT 1"], answer=["SELECT 1"])
    with pytest.raises(TunelabError, match="data field 'answer'.*they have: gold.*reference:"):
        _scores({"fn": "sql_exec", "db": str(shop_db)}, ["SELECT 1"], gold=["SELECT 1"])
    with pytest.raises(TunelabError, match="gold query of example 0 fails"):
        _scores({"fn": "sql_exec", "db": str(shop_db)}, ["SELECT 1"], answer=["SELECT nope FROM items"])
    with pytest.raises(TunelabError, match="not found"):
        _scores({"fn": "sql_exec", "db": str(tmp_path / "missing.sqlite")}, ["SELECT 1"], answer=["SELECT 1"])


def test_exact_match_normalises_and_accepts_lists():
    completions = ["  Paris ", "paris", "Lyon", "PARIS."]
    answers = ["Paris", ["Rome", "Paris"], "Paris", "Paris"]
    assert _scores({"fn": "exact_match"}, completions, answer=answers) == [1, 1, 0, 0]
    assert _scores({"fn": "exact_match", "normalize": False}, completions, answer=answers) == [0, 0, 0, 0]


def test_json_valid_and_json_schema(tmp_path):
    completions = ['{"name": "a", "age": 3}', '```json\n{"name": "b"}\n```', "{name: c}", '{"name": 5}']
    assert _scores({"fn": "json_valid"}, completions) == [1, 1, 0, 1]
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    assert _scores({"fn": "json_schema", "schema": schema}, completions) == [1, 1, 0, 0]
    path = tmp_path / "schema.json"
    path.write_text(json.dumps({**schema, "required": ["name", "age"]}))
    assert _scores({"fn": "json_schema", "schema": str(path)}, completions) == [1, 0, 0, 0]
    with pytest.raises(TunelabError, match="needs option.*schema"):
        load_reward({"fn": "json_schema"})


def test_regex_searches_with_flags():
    completions = ["<think>x</think> 42", "the answer is 42", "<THINK>y</THINK>7"]
    assert _scores({"fn": "regex", "pattern": r"^<think>.*</think>"}, completions) == [1, 0, 0]
    assert _scores({"fn": "regex", "pattern": r"^<think>.*</think>", "flags": "i"}, completions) == [1, 0, 1]
    with pytest.raises(TunelabError, match=r"option pattern '\(' is not a valid regular expression"):
        _scores({"fn": "regex", "pattern": "("}, completions)
    with pytest.raises(TunelabError, match="unknown flag 'q'"):
        _scores({"fn": "regex", "pattern": "a", "flags": "q"}, completions)
    with pytest.raises(TunelabError, match="needs option.*pattern"):
        load_reward({"fn": "regex"})


def test_length_penalty_over_a_maximum_or_around_a_target():
    completions = ["one two", "one two three four", "a b c d e f", "a b c d e f g h i j", "x" * 12]
    assert _scores({"fn": "length_penalty", "max_length": 4}, completions) == [0, 0, -0.5, -1, 0]
    assert _scores({"fn": "length_penalty", "target": 4}, completions) == [-0.5, 0, -0.5, -1, -0.75]
    assert _scores({"fn": "length_penalty", "max_length": 10, "unit": "chars"}, completions)[-1] == pytest.approx(-0.2)
    for bad, message in [({}, "exactly one"), ({"max_length": 4, "target": 4}, "exactly one"),
                         ({"max_length": 0}, "max_length=0"), ({"target": 2.5}, "target=2.5"),
                         ({"max_length": 4, "unit": "tokens"}, "unit='tokens'")]:
        with pytest.raises(TunelabError, match=message):
            _scores({"fn": "length_penalty", **bad}, completions)


def test_reward_model_is_loaded_once_and_scores_prompt_completion_pairs(monkeypatch, tmp_path):
    import tunelab.rewards

    loads, calls = [], []

    class Stub:
        def score(self, prompts, completions, *, batch_size=8):
            calls.append((prompts, completions, batch_size))
            return [float(len(c)) for c in completions]

    monkeypatch.setattr(tunelab.rewards, "load", lambda run: loads.append(run) or Stub())
    monkeypatch.setattr(builtins, "_REWARD_MODELS", {})
    rewards = RewardSet([{"fn": "reward_model", "run": str(tmp_path / "rm"), "batch_size": 2}])
    prompts = [[{"role": "user", "content": "hi"}], "hello"]
    for _ in range(2):
        per_function, total = rewards.score(["ab", "abcd"], prompts)
        assert per_function.tolist() == [[2.0], [4.0]] and total.tolist() == [2.0, 4.0]
    assert loads == [str(tmp_path / "rm")] and calls[0] == (prompts, ["ab", "abcd"], 2)


def test_reward_model_needs_a_reward_run(tmp_path, monkeypatch):
    import tunelab.rewards

    real_load, attempts = tunelab.rewards.load, []
    monkeypatch.setattr(tunelab.rewards, "load", lambda run: attempts.append(run) or real_load(run))
    with pytest.raises(TunelabError, match="reward 'reward_model': .*not a `recipe: reward` run"):
        _scores({"fn": "reward_model", "run": str(tmp_path)}, ["a", "b", "c"])
    assert str(tmp_path.resolve()) not in builtins._REWARD_MODELS
    assert len(attempts) == 1  # a user error is not retried example by example


# ---- user functions ----

USER_MODULE = '''
def correct(completions, prompts, answer, **fields):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]

def swapped(prompts, completions, **fields):  # TRL's documented order: we pass both by name
    return [float(len(c) > len(p)) for p, c in zip(prompts, completions)]

def named_only(c, p, answer):  # no **fields: it gets only what it names
    return [1.0 if x == a else 0.0 for x, a in zip(c, answer)]

def with_option(completions, prompts, *, bonus=0.0, **fields):
    return [bonus] * len(completions)

def scalar(completions, prompts, **fields):
    return 1.0

def short(completions, prompts, **fields):
    return [1.0] * (len(completions) - 1)

def nan_at_1(completions, prompts, **fields):
    return [0.0, float("nan")] + [0.0] * (len(completions) - 2)

def none_at_2(completions, prompts, **fields):
    return [0.0, 0.0, None]

def text(completions, prompts, **fields):
    return ["1.0"] * len(completions)

def raises_on_boom(completions, prompts, **fields):
    return [1 / 0 if c == "boom" else 1.0 for c in completions]

def batch_only(completions, prompts, **fields):
    if len(completions) > 1:
        raise RuntimeError("one at a time")
    return [0.0]

def array(completions, prompts, **fields):
    import numpy
    return numpy.arange(len(completions), dtype=numpy.float32)

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    return "my_rewards"


def test_user_functions_follow_the_contract(user_module):
    completions, prompts = ["4", "5 ", "10"], ["2+2", "2+3", "2+9"]
    rewards = RewardSet([{"fn": f"{user_module}:correct", "weight": 2.0},
                         {"fn": f"{user_module}:swapped", "weight": -0.5},
                         {"fn": f"{user_module}:named_only"},
                         {"fn": f"{user_module}:with_option", "bonus": 0.25},
                         {"fn": f"{user_module}:array"},
                         {"fn": "exact_match"}])
    per_function, total = rewards.score(completions, prompts, {"answer": ["4", "5", "11"], "level": [1, 2, 3]})
    assert per_function.shape == (3, 6) and per_function.dtype == torch.float32
    assert per_function[:, 0].tolist() == [1, 1, 0] and per_function[:, 1].tolist() == [0, 0, 0]
    assert per_function[:, 2].tolist() == [1, 0, 0] and per_function[:, 3].tolist() == [0.25] * 3
    assert per_function[:, 4].tolist() == [0, 1, 2] and per_function[:, 5].tolist() == [1, 1, 0]
    torch.testing.assert_close(total, per_function @ torch.tensor([2.0, -0.5, 1, 1, 1, 1]))
    assert rewards.names[0] == f"{user_module}:correct"


def test_repeated_functions_get_unique_labels():
    rewards = RewardSet([{"fn": "regex", "pattern": "a"}, {"fn": "regex", "pattern": "b"}])
    assert rewards.names == ["regex", "regex#2"]
    assert rewards.check(["a", "b"], ["p", "p"]) == {"regex": [1, 0], "regex#2": [0, 1]}


@pytest.mark.parametrize(("fn", "message"), [
    ("scalar", r"returned float 1.0, not a list of 3 numbers.*never broadcast"),
    ("short", r"returned 2 values for 3 completions"),
    ("nan_at_1", r"returned nan for example 1 \(completion 'b'\)"),
    ("none_at_2", r"returned None for example 2 \(completion 'boom'\).*return 0.0"),
    ("text", r"returned str '1.0' for example 0"),
    ("raises_on_boom", r"raised ZeroDivisionError: division by zero on example 2 \(completion 'boom', prompt 'r'\)"),
    ("batch_only", r"raised RuntimeError: one at a time on the batch of 3 completions \(though on no single one\)"),
])
def test_contract_violations_stop_naming_the_function_and_example(user_module, fn, message):
    rewards = RewardSet([{"fn": "exact_match"}, {"fn": f"{user_module}:{fn}"}])
    with pytest.raises(TunelabError, match=f"reward '{user_module}:{fn}' {message}"):
        rewards.score(["a", "b", "boom"], ["p", "q", "r"], {"answer": ["a", "b", "c"]})


def test_a_missing_field_is_named(user_module):
    with pytest.raises(TunelabError, match="takes answer, which is neither a data field.*have: gold"):
        RewardSet([{"fn": f"{user_module}:named_only"}]).check(["x"], ["p"], {"gold": ["x"]})
    with pytest.raises(TunelabError, match=r"raised TypeError.*'answer'.*on example 0"):
        RewardSet([{"fn": f"{user_module}:correct"}]).check(["x"], ["p"], {"gold": ["x"]})


def test_spec_errors_are_explained(user_module):
    cases = [
        ({"fn": "sql"}, r"unknown reward 'sql'; built-in rewards: exact_match, json_schema.*'package.module:function'"),
        ({"fn": "no_such_module_xyz:f"}, r"cannot import module 'no_such_module_xyz' \(ModuleNotFoundError"),
        ({"fn": f"{user_module}:missing"}, r"has no attribute 'missing'"),
        ({"fn": f"{user_module}:NOT_A_FUNCTION"}, r"is a int, not a function"),
        ({"fn": ":f"}, r"'package.module:function'"),
        ({"weight": 1.0}, r"write it as \{fn:"),
        ("exact_match", r"write it as \{fn:"),
        ({"fn": "exact_match", "weight": "high"}, r"weight='high'"),
        ({"fn": "exact_match", "weight": math.inf}, r"weight=inf"),
        ({"fn": "exact_match", "normalise": True}, r"does not take option\(s\) normalise; it takes: normalize, reference"),
        ({"fn": f"{user_module}:named_only", "bonus": 1}, r"does not take option\(s\) bonus; it takes: answer"),
    ]
    for spec, message in cases:
        with pytest.raises(TunelabError, match=message):
            load_reward(spec)
    with pytest.raises(TunelabError, match="grpo.rewards is empty"):
        RewardSet([])


def test_a_module_that_fails_to_import_is_reported(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TunelabError, match="cannot import module 'broken_rewards'.*no_such_dependency_xyz"):
        load_reward({"fn": "broken_rewards:f"})


def test_inputs_must_line_up():
    rewards = RewardSet([{"fn": "exact_match"}])
    with pytest.raises(TunelabError, match="2 prompts for 3 completions"):
        rewards.check(["a", "b", "c"], ["p", "q"], {"answer": ["a"] * 3})
    with pytest.raises(TunelabError, match="field 'answer' must hold one value per completion \\(3\\), got 2"):
        rewards.check(["a", "b", "c"], ["p"] * 3, {"answer": ["a"] * 2})
    with pytest.raises(TunelabError, match="clashes"):
        rewards.check(["a"], ["p"], {"prompts": ["p"]})
    with pytest.raises(TunelabError, match="option\\(s\\) normalize also name data field"):
        RewardSet([{"fn": "exact_match", "normalize": False}]).check(["a"], ["p"], {"answer": ["a"], "normalize": [1]})
    with pytest.raises(TunelabError, match="every completion must be a string"):
        rewards.check([None], ["p"], {"answer": ["a"]})


def test_dry_run_calls_every_function_on_a_sample(user_module):
    rewards = RewardSet([{"fn": "exact_match"}, {"fn": "length_penalty", "target": 1}])
    prompts, fields = [f"q{i}" for i in range(10)], {"answer": [str(i) for i in range(10)]}
    assert rewards.dry_run(None, prompts, fields) == {"exact_match": [0.0] * 4, "length_penalty": [-1.0] * 4}
    assert rewards.dry_run(fields["answer"], prompts, fields, n=2)["exact_match"] == [1.0, 1.0]
    records = [{"answer": a} for a in fields["answer"]]  # fields may also come as one record per prompt
    assert rewards.dry_run(["0", "x"], prompts[:2], records[:2])["exact_match"] == [1.0, 0.0]
    broken = RewardSet([{"fn": f"{user_module}:short"}])
    with pytest.raises(TunelabError, match="returned 3 values for 4 completions"):
        broken.dry_run(None, prompts, fields)
    with pytest.raises(TunelabError, match="no prompts"):
        rewards.dry_run(None, [], {})
    with pytest.raises(TunelabError, match="1 completions for 4 prompts"):
        rewards.dry_run(["a"], prompts, fields)


def test_fields_as_records_match_fields_as_columns():
    rewards = RewardSet([{"fn": "exact_match"}, {"fn": "regex", "pattern": "^a"}])
    completions, prompts = ["a", "b", "ab"], ["p", "q", "r"]
    columns = rewards.score(completions, prompts, {"answer": ["a", "c", "ab"], "id": [1, 2, 3]})
    records = rewards.score(completions, prompts, [{"answer": "a", "id": 1}, {"answer": "c"}, {"id": 3, "answer": "ab"}])
    for a, b in zip(columns, records):
        torch.testing.assert_close(a, b)
    with pytest.raises(TunelabError, match="2 records of fields for 3 completions"):
        rewards.score(completions, prompts, [{"answer": "a"}] * 2)
    with pytest.raises(TunelabError, match="pass fields as"):
        rewards.score(completions, prompts, ["a", "b", "c"])


def test_registering_a_builtin(monkeypatch):
    copy = Registry("reward")
    for name, fn in catalog.REWARDS.items():
        copy.register(name, fn)
    monkeypatch.setattr(catalog, "REWARDS", copy)

    @register_reward("always_one")
    def always_one(completions, prompts, **fields):
        return np.ones(len(completions))

    assert "always_one" in reward_names()
    assert _scores({"fn": "always_one"}, ["a", "b"]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="registered twice"):
        register_reward("always_one")(always_one)
    with pytest.raises(ValueError, match="without ':'"):
        register_reward("a:b")
