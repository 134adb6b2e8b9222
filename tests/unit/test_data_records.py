"""Loading and validating instruction data files: formats, file types, and error collection."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tunelab.data import Example, data_fingerprint, load_examples
from tunelab.errors import ConfigError, DataError, TunelabError

PC = {"prompt": "What is 2+2?", "completion": "4"}
EXPECTED_PC = ({"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"})


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def problems_of(excinfo: pytest.ExceptionInfo) -> list[str]:
    assert isinstance(excinfo.value, DataError)
    return excinfo.value.problems


# --- formats -------------------------------------------------------------------------------------


def test_messages_format_multi_turn_with_system(tmp_path):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": conv}])
    [ex] = load_examples([path])
    assert ex == Example(tuple(conv), f"{path}:1")


def test_prompt_completion_with_optional_system(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PC, {**PC, "system": "Be exact."}])
    first, second = load_examples([path], format="prompt_completion")
    assert first.messages == EXPECTED_PC
    assert second.messages == ({"role": "system", "content": "Be exact."}, *EXPECTED_PC)
    assert (first.source, second.source) == (f"{path}:1", f"{path}:2")


def test_alpaca_input_joined_only_when_non_empty(tmp_path):
    records = [
        {"instruction": "Translate", "input": "hello", "output": "bonjour"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Say bye", "output": "bye", "system": "S"},
    ]
    a, b, c = load_examples([write_jsonl(tmp_path / "a.jsonl", records)])
    assert a.messages[0] == {"role": "user", "content": "Translate\n\nhello"}
    assert b.messages[0] == {"role": "user", "content": "Say hi"}
    assert c.messages == (
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Say bye"},
        {"role": "assistant", "content": "bye"},
    )


def test_raw_template_renders_record_fields(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"q": "2+2", "a": 4, "topic": "math"}])
    template = {"prompt": "Compute {{ q }}", "response": "{{ a }}", "system": "You teach {{ topic }}."}
    [ex] = load_examples([path], template=template)  # auto-detected as raw because a template is given
    assert ex.messages == (
        {"role": "system", "content": "You teach math."},
        {"role": "user", "content": "Compute 2+2"},
        {"role": "assistant", "content": "4"},
    )


def test_raw_template_missing_field_is_a_per_record_error(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"q": "a", "a": "b"}, {"q": "c"}, {"q": "d", "a": "e"}])
    with pytest.raises(DataError) as excinfo:
        load_examples([path], format="raw", template={"prompt": "{{ q }}", "response": "{{ a }}"})
    [problem] = problems_of(excinfo)
    assert problem.startswith(f"{path}:2: data.template.response")
    assert "'a' is undefined" in problem and "record has fields: q" in problem


def test_raw_template_syntax_error_is_config_error(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"q": "a"}])
    with pytest.raises(ConfigError, match="data.template.prompt"):
        load_examples([path], format="raw", template={"prompt": "{{ q ", "response": "x"})


def test_raw_without_template_is_refused(tmp_path):
    with pytest.raises(TunelabError, match="data.template"):
        load_examples([write_jsonl(tmp_path / "r.jsonl", [PC])], format="raw")


def test_system_prompt_added_only_where_missing(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PC, {**PC, "system": "Own."}])
    a, b = load_examples([path], system_prompt="Default.")
    assert a.messages[0] == {"role": "system", "content": "Default."}
    assert [m["content"] for m in b.messages if m["role"] == "system"] == ["Own."]


def test_auto_detect_failure_lists_keys_and_options(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as excinfo:
        load_examples([path])
    [problem] = problems_of(excinfo)
    assert problem.startswith(f"{path}:1: cannot tell the data format")
    assert "['answer', 'question']" in problem
    assert "data.format" in problem and "data.template" in problem


def test_auto_detect_is_per_file(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [PC])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "Say hi", "output": "hi"}])
    first, second = load_examples([a, b])
    assert first.messages == EXPECTED_PC
    assert second.messages[-1] == {"role": "assistant", "content": "hi"}


# --- file types ----------------------------------------------------------------------------------


def test_json_array_and_wrapped_object(tmp_path):
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([PC, PC]), encoding="utf-8")
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"data": [PC]}), encoding="utf-8")
    examples = load_examples([str(arr), str(wrapped)])
    assert [e.source for e in examples] == [f"{arr}:record 1", f"{arr}:record 2", f"{wrapped}:record 1"]
    assert all(e.messages == EXPECTED_PC for e in examples)


def test_csv_rows_report_their_starting_line(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "completion"])
        writer.writerow(["multi\nline prompt", "ok"])  # occupies lines 2-3
        writer.writerow(["second", "fine"])  # line 4
        writer.writerow(["third", "  "])  # line 5: empty answer
    with pytest.raises(DataError) as excinfo:
        load_examples([str(path)])
    [problem] = problems_of(excinfo)
    assert problem.startswith(f"{path}:5: field 'completion' is empty")
    path.write_text("prompt,completion\n\"multi\nline\",ok\nsecond,fine\n", encoding="utf-8")
    a, b = load_examples([str(path)])
    assert (a.source, b.source) == (f"{path}:2", f"{path}:4")
    assert a.messages[0]["content"] == "multi\nline"


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "d.parquet"
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    pd.DataFrame({"messages": [conv, conv]}).to_parquet(path)
    examples = load_examples([str(path)])
    assert [e.source for e in examples] == [f"{path}:record 1", f"{path}:record 2"]
    assert examples[0].messages == tuple(conv)


def test_saved_hf_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([PC, {**PC, "completion": "four"}])
    ds.save_to_disk(str(tmp_path / "plain"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    plain = load_examples([str(tmp_path / "plain")])
    assert [e.source for e in plain] == [f"{tmp_path / 'plain'}:record {i}" for i in (1, 2)]
    assert plain[1].messages[-1]["content"] == "four"
    assert len(load_examples([str(tmp_path / "dd")])) == 2  # the train split


# --- errors --------------------------------------------------------------------------------------


def test_jsonl_collects_every_bad_line_and_no_others(tmp_path):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    lines = [
        json.dumps(good).encode(),  # 1
        b'{"messages": [',  # 2 bad JSON
        json.dumps({"prompt": "x"}).encode(),  # 3 messages missing
        b"",  # 4 blank: skipped silently
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " \n"}]}).encode(),
        json.dumps({"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}).encode(),
        b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',  # 7 latin-1 byte
        json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode(),  # 8 no assistant
        json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}).encode(),
        json.dumps(["not", "an", "object"]).encode(),  # 10
        json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}).encode(),  # 11
        json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}).encode(),
        json.dumps(good).encode(),  # 13
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as excinfo:
        load_examples([str(path)], format="messages")
    problems = problems_of(excinfo)
    assert [int(p.split(":")[1]) for p in problems] == [2, 3, 5, 6, 7, 8, 9, 10, 11, 12]
    text = "\n".join(problems)
    for expected in (
        "2: invalid JSON",
        "3: field 'messages' is missing",
        "5: message 2 (assistant) is empty",
        "6: message 1 has unknown role 'bot'; allowed roles: system, user, assistant",
        "7: not valid UTF-8 (byte 0xe9",
        "8: conversation has no assistant message",
        "9: the last message is from 'user'",
        "10: record is a list",
        "11: message 1 has no 'content'",
        "12: message 1 'content' must be a string, got a number",
    ):
        assert f"{path}:{expected}" in text
    assert str(path) in str(excinfo.value)


def test_file_level_problems_one_each(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    odd = tmp_path / "data.txt"
    odd.write_text("x", encoding="utf-8")
    missing = tmp_path / "nope.jsonl"
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[\n{"prompt": "a",\n "completion": }\n]', encoding="utf-8")
    latin = tmp_path / "l.csv"
    latin.write_bytes(b"prompt,completion\na,b\nc,caf\xe9\n")
    paths = [str(p) for p in (empty, odd, missing, bad_json, latin)]
    with pytest.raises(DataError) as excinfo:
        load_examples(paths)
    problems = problems_of(excinfo)
    assert len(problems) == 5
    assert problems[0].startswith(f"{empty}: no records")
    assert problems[1].startswith(f"{odd}: unknown file type '.txt'")
    assert problems[2].startswith(f"{missing}: file not found")
    assert problems[3].startswith(f"{bad_json}:3: invalid JSON")
    assert problems[4].startswith(f"{latin}:3: not valid UTF-8")


def test_wrong_field_types_and_missing_fields(tmp_path):
    records = [{"prompt": 1, "completion": "a"}, {"prompt": "p", "completion": None}, {"prompt": "p"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError) as excinfo:
        load_examples([path], format="prompt_completion")
    assert problems_of(excinfo) == [
        f"{path}:1: field 'prompt' must be a string, got a number",
        f"{path}:2: field 'completion' is null (record has fields: completion, prompt)",
        f"{path}:3: field 'completion' is missing (record has fields: prompt)",
    ]


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(TunelabError, match="unknown data.format 'sharegpt'"):
        load_examples([write_jsonl(tmp_path / "d.jsonl", [PC])], format="sharegpt")


# --- fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_changes_with_one_byte(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n')
    before = data_fingerprint([str(path)])
    assert before == data_fingerprint([str(path)]) and len(before) == 64
    path.write_bytes(b'{"prompt": "a", "completion": "c"}\n')
    assert data_fingerprint([str(path)]) != before


def test_fingerprint_of_directory_covers_contents_and_names(tmp_path):
    folder = tmp_path / "ds"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"abc")
    (folder / "sub" / "b.bin").write_bytes(b"def")
    before = data_fingerprint([str(folder)])
    (folder / "sub" / "b.bin").write_bytes(b"dEf")
    changed = data_fingerprint([str(folder)])
    assert changed != before
    (folder / "sub" / "b.bin").rename(folder / "sub" / "c.bin")
    assert data_fingerprint([str(folder)]) != changed


def test_fingerprint_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        data_fingerprint([str(tmp_path / "missing.jsonl")])
