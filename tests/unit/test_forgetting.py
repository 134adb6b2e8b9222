import json

import pytest

from tunelab.data import Example
from tunelab.errors import TunelabError
from tunelab.evaluation.report import _accepted, describe_retention, few_shot_examples, load_probe, retention


def test_builtin_probe_loads_and_user_probe_errors_name_the_line(tmp_path):
    items = load_probe(True)
    assert len(items) >= 30 and all(i["answers"] for i in items)
    assert load_probe(False) is None
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"id": "a", "question": "q?", "answers": ["x"]}) + "\n" + '{"question": "no answers"}\n')
    with pytest.raises(TunelabError, match=r"p.jsonl:2"):
        load_probe(str(bad))


def test_the_completion_probe_asks_the_same_facts_as_text_to_continue(tmp_path):
    chat, completion = load_probe(True), load_probe("completion")
    assert len(completion) == 40 and all("prompt" in i and "question" not in i for i in completion)
    shared = {i["id"] for i in chat} & {i["id"] for i in completion}
    assert len(shared) >= 30  # the same facts, where a fact reads as a sentence to finish
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"id": "a", "question": "q?", "prompt": "p", "answers": ["x"]}) + "\n")
    with pytest.raises(TunelabError, match=r"both.jsonl:1.*\"question\" \(a chat turn\) or \"prompt\""):
        load_probe(str(both))


def test_answers_match_as_whole_words_only():
    assert _accepted("The capital is Paris.", ["paris"])
    assert not _accepted("Parisian food", ["paris"])
    assert _accepted("2 + 3 = 5", ["5", "five"]) and not _accepted("15", ["5"])


def test_retention_counts_lost_and_gained_items():
    items = [{"id": str(i), "question": f"q{i}", "answers": ["x"]} for i in range(4)]
    before = [{"id": str(i), "answer": "", "right": r} for i, r in enumerate([True, True, False, True])]
    after = [{"id": str(i), "answer": f"a{i}", "right": r} for i, r in enumerate([True, False, True, True])]
    result = retention(items, before, after)
    assert result["right_before"] == 3 and result["right_after"] == 3
    assert result["retention"] == pytest.approx(2 / 3)
    assert [x["id"] for x in result["lost"]] == ["1"] and result["lost"][0]["after"] == "a1"
    assert result["gained"] == ["2"]


def test_few_shot_puts_train_turns_after_the_system_prompt():
    system = {"role": "system", "content": "S"}
    train = [Example((system, {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}), f"t:{i}") for i in range(5)]
    target = Example((system, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}), "e:1")
    [shot] = few_shot_examples([target], train, k=2, seed=0)
    roles = [m["role"] for m in shot.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert shot.messages[-2]["content"] == "Q" and shot.messages[-1]["content"] == "A" and shot.source == "e:1"


def test_retention_pairs_items_by_id_not_by_position():
    items = [{"id": i, "question": f"q{i}", "answers": ["x"]} for i in "abc"]
    before = [{"id": "a", "answer": "", "right": True}, {"id": "b", "answer": "", "right": False},
              {"id": "c", "answer": "", "right": True}]
    # the probe file changed between before and after: other order, b gone, d new
    after = [{"id": "c", "answer": "c!", "right": True}, {"id": "a", "answer": "a!", "right": False},
             {"id": "d", "answer": "d!", "right": True}]
    result = retention(items, before, after)
    assert result["items"] == 2 and result["right_before"] == 2 and result["right_after"] == 1
    assert result["retention"] == pytest.approx(1 / 2)
    assert [x["id"] for x in result["lost"]] == ["a"] and result["lost"][0]["after"] == "a!"
    assert result["lost"][0]["question"] == "qa" and result["gained"] == []
    assert sorted(result["unpaired"]) == ["b", "d"]


def test_retention_does_not_pair_an_id_whose_question_changed():
    items = [{"id": "a", "question": "new?", "answers": ["x"]}]
    before = [{"id": "a", "question": "old?", "answer": "", "right": True}]
    after = [{"id": "a", "question": "new?", "answer": "", "right": False}]
    result = retention(items, before, after)
    assert result["items"] == 0 and result["lost"] == [] and result["unpaired"] == ["a"] and result["retention"] is None


def test_a_probe_the_untuned_model_fails_has_no_retention_not_100_percent():
    items = [{"id": i, "question": f"q{i}", "answers": ["x"]} for i in "ab"]
    before = [{"id": i, "answer": "", "right": False} for i in "ab"]
    after = [{"id": "a", "answer": "x", "right": True}, {"id": "b", "answer": "", "right": False}]
    result = retention(items, before, after)
    assert result["retention"] is None and result["gained"] == ["a"]
    assert describe_retention(result) == "n/a (the untuned model answered none of the 2 probe items)"
    kept = retention(items, [{"id": "a", "answer": "x", "right": True}, before[1]], [before[0], before[1]])
    assert describe_retention(kept) == "0% (0 of the 1 probe items the untuned model answered)"


def test_probe_ids_must_be_unique(tmp_path):
    probe = tmp_path / "p.jsonl"
    probe.write_text("".join(json.dumps({"id": "a", "question": f"q{i}?", "answers": ["x"]}) + "\n" for i in range(2)))
    with pytest.raises(TunelabError, match=r"p.jsonl:2: id 'a' is already used on line 1"):
        load_probe(str(probe))
