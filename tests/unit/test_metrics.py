"""Metrics: each one on small hand-made examples with known answers."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from tunelab.errors import TunelabError
from tunelab.evaluation.metrics import MetricResult, metric_names, parse_label, score
from tunelab.evaluation.sql_exec import has_top_level_order_by


# ----------------------------------------------------------------------------------------- general


def test_metric_names_lists_builtins():
    names = metric_names()
    assert {"exact_match", "contains", "regex", "rouge_l", "bleu", "chrf", "accuracy", "json_valid",
            "json_schema", "json_fields", "sql_exec", "tool_call"} == set(names)


def test_json_fields_scores_each_field_and_names_the_wrong_ones():
    ref = json.dumps({"name": "Ana Diaz", "quantity": 3, "express": True, "city": "Porto"})
    preds = ['{"name": " ana  diaz", "quantity": 3.0, "express": true, "city": "Lisbon", "extra": 1}',
             '```json\n{"name": "Ana Diaz", "quantity": "3", "express": 1}\n```', "not json", "[1, 2]"]
    result = score("json_fields", preds, [ref] * 4)
    assert result.per_example == [0.75, 0.25, 0.0, 0.0]  # "3" is not 3, 1 is not true, a missing field is wrong
    assert result.details[0] == {"wrong": ["city"]} and result.details[1] == {"missing": ["city"], "wrong": ["quantity", "express"]}
    assert result.details[3]["error"] == "not a JSON object"
    only = score("json_fields", [preds[0]], [ref], fields=["name", "quantity"])
    assert only.per_example == [1.0]
    with pytest.raises(TunelabError, match="not a JSON object"):
        score("json_fields", ["{}"], ["[1]"])


def test_unknown_metric_lists_known_ones_and_custom_form():
    with pytest.raises(TunelabError) as e:
        score("exact_mtch", ["a"], ["a"])
    msg = str(e.value)
    assert "exact_mtch" in msg and "exact_match" in msg and "sql_exec" in msg and "module:function" in msg


def test_length_mismatch_is_an_error():
    with pytest.raises(TunelabError, match="2 predictions but 1 references"):
        score("exact_match", ["a", "b"], ["a"])


def test_unknown_option_is_an_error():
    with pytest.raises(TunelabError, match="normalise"):
        score("exact_match", ["a"], ["a"], normalise=False)


def test_empty_reference_list_is_an_error():
    with pytest.raises(TunelabError, match="reference 0"):
        score("exact_match", ["a"], [[]])


@pytest.mark.parametrize("metric", ["exact_match", "contains", "regex", "rouge_l", "bleu", "chrf", "accuracy", "json_valid"])
def test_empty_input_scores_zero(metric):
    result = score(metric, [], [])
    assert result == MetricResult(metric, 0.0, [], [])


# ---------------------------------------------------------------------------------- string metrics


def test_exact_match_normalises_and_takes_best_reference():
    result = score("exact_match", ["  Paris\n is  NICE ", "Lyon", "Rome", "berlin"],
                   ["paris is nice", "Paris", ["Roma", "rome"], ["x", "y"]])
    assert result.per_example == [1.0, 0.0, 1.0, 0.0]
    assert result.score == pytest.approx(0.5)
    assert len(result.details) == 4


def test_exact_match_without_normalisation():
    assert score("exact_match", ["Paris ", "Paris"], ["Paris", "Paris"], normalize=False).per_example == [0.0, 1.0]


def test_contains():
    result = score("contains", ["The answer is  PARIS, France.", "It is Lyon", "no idea"],
                   ["paris", ["Marseille", "lyon"], "Paris"])
    assert result.per_example == [1.0, 1.0, 0.0]


def test_regex_with_flags_and_lists():
    result = score("regex", ["Answer: 42", "answer: 42", "the year 1999", "nothing"],
                   [r"Answer:\s*42\b", r"^Answer", [r"\b20\d\d\b", r"\b19\d\d\b"], r"\d"])
    assert result.per_example == [1.0, 0.0, 1.0, 0.0]
    assert score("regex", ["answer: 42"], [r"^Answer"], flags="i").per_example == [1.0]


def test_bad_regex_names_the_pattern():
    with pytest.raises(TunelabError, match=r"example 1.*\(unclosed"):
        score("regex", ["a", "b"], ["a", "(unclosed"])
    with pytest.raises(TunelabError, match="flag 'q'"):
        score("regex", ["a"], ["a"], flags="iq")


def test_rouge_l():
    result = score("rouge_l", ["the cat sat on the mat", "dogs bark loudly", "completely different words"],
                   ["the cat sat on the mat", ["cats sitting on mats", "dog barking loudly"], "the cat sat"])
    assert result.per_example[0] == pytest.approx(1.0)
    assert result.per_example[1] == pytest.approx(1.0)  # stemming: dogs/dog, bark/barking
    assert result.per_example[2] == 0.0
    assert result.score == pytest.approx(2 / 3)


@pytest.mark.parametrize("metric", ["bleu", "chrf"])
def test_sacrebleu_metrics_identical_and_unrelated(metric):
    same = "the quick brown fox jumps over the lazy dog near the river bank"
    result = score(metric, [same, same], [same, same])
    assert result.score == pytest.approx(1.0)
    assert result.per_example == pytest.approx([1.0, 1.0])
    low = score(metric, ["purple elephants compute quantum tax forms"], [same])
    assert low.score < 0.2 and low.per_example[0] < 0.2


@pytest.mark.parametrize("metric", ["bleu", "chrf"])
def test_sacrebleu_metrics_multiple_references(metric):
    pred = "the quick brown fox jumps over the lazy dog near the river bank"
    one = score(metric, [pred, pred], ["a totally unrelated sentence about tax forms", pred])
    many = score(metric, [pred, pred], [["a totally unrelated sentence about tax forms", pred], pred])
    assert many.per_example == pytest.approx([1.0, 1.0])
    assert one.per_example[0] < 0.3
    assert many.score == pytest.approx(1.0) and one.score < 1.0


# ------------------------------------------------------------------------------------ classification


def test_accuracy_plain_first_line():
    result = score("accuracy", ['"Positive."', "negative\nbecause reasons", "The sentiment is positive."],
                   ["positive", "NEGATIVE", "positive"])
    assert result.per_example == [1.0, 1.0, 0.0]
    assert result.details[0] == {"parsed": "positive"}


def test_accuracy_with_labels_maps_to_label():
    labels = ["positive", "negative", "neutral"]
    preds = ["The sentiment is positive.", "**Negative**", "I'd say neutral, not negative", "unpositive vibes", "mixed"]
    result = score("accuracy", preds, ["positive", "negative", "neutral", "positive", "neutral"], labels=labels)
    assert result.per_example == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert [d["parsed"] for d in result.details] == ["positive", "negative", "neutral", "", ""]


def test_parse_label_prefers_exact_first_line_and_longer_labels():
    assert parse_label("not good", ["good", "not good"]) == "not good"
    assert parse_label("It is very good overall", ["good", "very good"]) == "very good"


# ------------------------------------------------------------------------------------------------ JSON


def test_json_valid_accepts_fences_and_reports_errors():
    preds = ['{"a": 1}', '```json\n{"a": [1, 2]}\n```', '```\n[1]\n```', "{'a': 1}", "Sure! {\"a\": 1}"]
    result = score("json_valid", preds, [""] * len(preds))
    assert result.per_example == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert "error" in result.details[3] and "property name" in result.details[3]["error"]
    assert result.details[0] == {}


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"]}


def test_json_schema_pass_and_fail(tmp_path):
    preds = ['{"name": "Ann", "age": 3}', '```json\n{"name": "Bo", "age": 4}\n```', '{"name": "Cy", "age": -1}',
             '{"name": "Di"}', "not json"]
    result = score("json_schema", preds, [""] * 5, schema=SCHEMA)
    assert result.per_example == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert result.details[2]["error"].startswith("age: ") and "minimum" in result.details[2]["error"]
    assert "'age' is a required property" in result.details[3]["error"]
    assert result.details[4]["error"].startswith("invalid JSON")
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    assert score("json_schema", preds, [""] * 5, schema=str(path)).per_example == result.per_example


def test_json_schema_option_errors(tmp_path):
    with pytest.raises(TunelabError, match="needs option.*schema"):
        score("json_schema", ["{}"], [""])
    with pytest.raises(TunelabError, match="not found"):
        score("json_schema", ["{}"], [""], schema=str(tmp_path / "missing.json"))
    with pytest.raises(TunelabError, match="schema itself is invalid"):
        score("json_schema", ["{}"], [""], schema={"type": 12})


# ------------------------------------------------------------------------------------------------- SQL


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "shop.db"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL, qty INTEGER);
        INSERT INTO items VALUES (1, 'apple', 1.5, 10), (2, 'pear', 2.0, 0), (3, 'plum', 0.5, 7), (4, 'fig', 3.25, 2);
    """)
    conn.commit()
    conn.close()
    return path


def _count(path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    finally:
        conn.close()


def test_sql_equivalent_queries_score_one(db):
    gold = "SELECT name, price FROM items WHERE qty > 1 AND price < 3"
    preds = [
        "select name AS n, price AS p from items where price < 3 and qty > 1;",  # alias, WHERE order, semicolon
        "```sql\nSELECT i.name, i.price FROM items i WHERE i.price < 3 AND i.qty >= 2 ORDER BY name DESC;\n```",
        "SELECT name, price FROM items WHERE qty > 1",  # wrong: includes fig
        "SELECT name FROM items WHERE qty > 1 AND price < 3",  # wrong: missing column
    ]
    result = score("sql_exec", preds, [gold] * 4, db=str(db))
    assert result.per_example == [1.0, 1.0, 0.0, 0.0]
    assert result.details[0]["ordered"] is False


def test_sql_int_and_float_values_compare_equal(db):
    result = score("sql_exec", ["SELECT 2.0, 0.1 + 0.2", "SELECT 2, 0.300001"], ["SELECT 2, 0.3", "SELECT 2, 0.3"], db=db)
    assert result.per_example == [1.0, 0.0]


def test_sql_order_by_sensitivity(db):
    asc, desc = "SELECT name FROM items ORDER BY price", "SELECT name FROM items ORDER BY price DESC"
    unordered = "SELECT name FROM items WHERE id IN (SELECT id FROM items ORDER BY price)"
    result = score("sql_exec", [desc, asc, desc], [asc, asc, unordered], db=db)
    assert result.per_example == [0.0, 1.0, 1.0]
    assert [d["ordered"] for d in result.details] == [True, True, False]


def test_order_by_heuristic():
    assert has_top_level_order_by("select a from t order\n  by a")
    assert not has_top_level_order_by("select a from (select a from t order by a)")
    assert not has_top_level_order_by("select 'order by' from t -- order by a")
    assert not has_top_level_order_by("select row_number() over (order by a) from t")
    assert has_top_level_order_by("with x as (select 1 as a) select a from x order by a")


def test_sql_errors_score_zero_with_detail(db):
    preds = ["SELEC name FROM items", "SELECT nope FROM items", "SELECT name FROM items; SELECT 1", "SELECT 1; -- done"]
    result = score("sql_exec", preds, ["SELECT name FROM items"] * 3 + ["SELECT 1"], db=db)
    assert result.per_example == [0.0, 0.0, 0.0, 1.0]
    assert "syntax error" in result.details[0]["error"]
    assert "no such column" in result.details[1]["error"]
    assert result.details[2] == {"error": "multiple statements"}


def test_sql_never_writes(db):
    preds = ["DELETE FROM items", "DROP TABLE items", "UPDATE items SET qty = 0",
             "INSERT INTO items VALUES (9, 'kiwi', 1, 1)", "ATTACH DATABASE 'other.db' AS o",
             "SELECT 1; DELETE FROM items"]
    result = score("sql_exec", preds, ["SELECT COUNT(*) FROM items"] * len(preds), db=db)
    assert result.per_example == [0.0] * len(preds)
    assert all("error" in d for d in result.details)
    assert _count(db) == 4


def test_sql_connection_is_read_only_even_without_the_authorizer(db):
    from tunelab.evaluation.sql_exec import _connect

    conn, _ = _connect(db)
    conn.set_authorizer(None)  # the read-only URI and query_only pragma must still refuse writes
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly|read-only|query_only"):
            conn.execute("DELETE FROM items")
    finally:
        conn.close()
    assert _count(db) == 4


def test_sql_runaway_query_is_stopped(db):
    runaway = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"
    result = score("sql_exec", [runaway], ["SELECT 1"], db=db, timeout_s=0.2)
    assert result.per_example == [0.0]
    assert "timeout_s" in result.details[0]["error"]


def test_sql_accepts_list_of_gold_queries(db):
    result = score("sql_exec", ["SELECT 2"], [["SELECT 1", "SELECT 2"]], db=db)
    assert result.per_example == [1.0]


def test_sql_option_and_gold_errors(db, tmp_path):
    with pytest.raises(TunelabError, match="needs option.*db"):
        score("sql_exec", ["SELECT 1"], ["SELECT 1"])
    with pytest.raises(TunelabError, match="not found"):
        score("sql_exec", ["SELECT 1"], ["SELECT 1"], db=str(tmp_path / "missing.db"))
    with pytest.raises(TunelabError, match="gold query of example 1"):
        score("sql_exec", ["SELECT 1", "SELECT 1"], ["SELECT 1", "SELECT * FROM missing_table"], db=db)
    assert not (tmp_path / "missing.db").exists()


@pytest.fixture
def big_db(tmp_path):
    """A table of 1,000 rows: a join without its condition gives a million."""
    path = tmp_path / "big.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"row {i}") for i in range(1000)])
    conn.commit()
    conn.close()
    return path


def test_sql_result_over_max_rows_is_wrong_and_not_fetched(big_db):
    # Before the fix the metric fetched every row (1 GB for the million rows of this join without LIMIT).
    forgotten_join = "SELECT a.id, b.id FROM t a, t b LIMIT 200000"
    result = score("sql_exec", [forgotten_join], ["SELECT COUNT(*) FROM t"], db=big_db)
    assert result.per_example == [0.0]
    assert "more than max_rows=10000 rows" in result.details[0]["error"]
    small = score("sql_exec", ["SELECT id FROM t LIMIT 5", "SELECT id FROM t LIMIT 6"], ["SELECT id FROM t LIMIT 5"] * 2,
                  db=big_db, max_rows=5)
    assert small.per_example == [1.0, 0.0]
    assert "max_rows=5" in small.details[1]["error"]
    with pytest.raises(TunelabError, match=r"gold query of example 0.*max_rows=5.*raise timeout_s, max_rows or max_bytes"):
        score("sql_exec", ["SELECT 1"], ["SELECT id FROM t"], db=big_db, max_rows=5)


def test_sql_huge_values_are_wrong_not_fatal(db):
    # Before the fix zeroblob(400000000) built the blob (and raised MemoryError out of score() where
    # memory was short); here 50 MB is over the default max_bytes of 10 MB and must fail inside SQLite.
    preds = ["SELECT zeroblob(50000000)", "SELECT length(zeroblob(400000000))", "SELECT name FROM items"]
    result = score("sql_exec", preds, ["SELECT 1", "SELECT 1", "SELECT name FROM items"], db=db)
    assert result.per_example == [0.0, 0.0, 1.0]
    assert all("too big" in d["error"] or "max_bytes" in d["error"] for d in result.details[:2])
    result = score("sql_exec", ["SELECT group_concat(name) FROM items"], ["SELECT 1"], db=db, max_bytes=10)
    assert "max_bytes=10" in result.details[0]["error"] or "too big" in result.details[0]["error"]


def test_sql_result_bytes_are_capped_without_sqlites_length_limit(db):
    # Python 3.10 cannot set SQLite's length limit; the fetched result is still measured.
    from tunelab.evaluation.sql_exec import _connect, _run_sql

    conn, deadline = _connect(db)
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 10**9)
    try:
        assert _run_sql(conn, deadline, "SELECT zeroblob(2000)", 1.0, max_bytes=2000) == [(bytes(2000),)]
        with pytest.raises(ValueError, match="max_bytes=2000"):
            _run_sql(conn, deadline, "SELECT zeroblob(2001)", 1.0, max_bytes=2000)
    finally:
        conn.close()


def test_sql_single_long_function_call_is_stopped(db):
    # One instr call: SQLite's progress handler never runs inside it, and finding a 1M-character needle that
    # almost matches everywhere in a 4M-character haystack compares ~10^12 bytes (minutes), within the length
    # limit. (A huge printf width used to do this; SQLite 3.40.1-2+deb12u2 returns at once.)
    start = time.monotonic()
    slow = "SELECT instr(replace(hex(zeroblob(2000000)), '0', 'a'), replace(hex(zeroblob(500000)), '0', 'a') || 'b')"
    result = score("sql_exec", [slow, "SELECT 1"], ["SELECT 1", "SELECT 1"], db=db, timeout_s=0.2)
    assert result.per_example == [0.0, 1.0]  # the query process was restarted for the next example
    assert "query stopped after 0.2 s (timeout_s)" in result.details[0]["error"]
    assert time.monotonic() - start < 8


@pytest.mark.parametrize("error", [MemoryError, RecursionError, OverflowError, sqlite3.DatabaseError, KeyError])
def test_sql_any_failure_of_a_prediction_scores_zero(db, monkeypatch, error):
    from tunelab.evaluation import sql_exec

    real_run = sql_exec.SqlProcess.run

    def run(self, sql):
        if sql == "SELECT 2":
            raise error("boom")
        return real_run(self, sql)

    monkeypatch.setattr(sql_exec.SqlProcess, "run", run)
    result = score("sql_exec", ["SELECT 2", "SELECT 1"], ["SELECT 1", "SELECT 1"], db=db)
    assert result.per_example == [0.0, 1.0]
    assert result.details[0]["error"].startswith(error.__name__)


@pytest.mark.parametrize("option, value", [("timeout_s", 0), ("timeout_s", -1), ("timeout_s", "2s"), ("timeout_s", True),
                                           ("timeout_s", float("nan")), ("timeout_s", float("inf")), ("max_rows", 0),
                                           ("max_rows", 2.5), ("max_bytes", "10"), ("max_bytes", -5)])
def test_sql_options_are_checked_before_any_generation(db, option, value):
    with pytest.raises(TunelabError, match=rf"option {option} must be a positive"):
        score("sql_exec", [], [], db=db, **{option: value})


def test_sql_valid_options_pass_the_early_check(db):
    assert score("sql_exec", [], [], db=db, timeout_s=1, max_rows=10, max_bytes=1000).per_example == []


# ---------------------------------------------------------------------------------------------- custom


def test_custom_metric(tmp_path, monkeypatch):
    pkg = tmp_path / "mymetrics_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scoring.py").write_text(
        "def length_ratio(prediction, reference, scale=1.0):\n"
        "    ref = reference[0] if isinstance(reference, list) else reference\n"
        "    return {'score': scale * min(len(prediction), len(ref)) / max(len(prediction), len(ref)), 'ref': ref}\n"
        "def is_upper(prediction, reference):\n"
        "    return prediction.isupper()\n"
        "def broken(prediction, reference):\n"
        "    return {'value': 1}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = score("mymetrics_pkg.scoring:length_ratio", ["abcd", "ab"], ["abcd", ["abcd", "x"]], scale=0.5)
    assert result.per_example == [0.5, 0.25]
    assert result.score == pytest.approx(0.375)
    assert result.details == [{"ref": "abcd"}, {"ref": "abcd"}]
    assert score("mymetrics_pkg.scoring:is_upper", ["ABC", "abc"], ["", ""]).per_example == [1.0, 0.0]
    with pytest.raises(TunelabError, match="'score' key"):
        score("mymetrics_pkg.scoring:broken", ["a"], ["a"])
    with pytest.raises(TunelabError, match=r"mymetrics_pkg\.scoring.*no attribute 'missing'"):
        score("mymetrics_pkg.scoring:missing", ["a"], ["a"])
    with pytest.raises(TunelabError, match=r"cannot import module 'no_such_pkg\.mod'.*fn"):
        score("no_such_pkg.mod:fn", ["a"], ["a"])
