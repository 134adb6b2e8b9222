"""Tool calling records (OpenAI format): validation with file:line, rendering (native template and fallback),
loss masks that train the assistant's calls and answers only, and a tiny SFT run on them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from rich.console import Console

from tunelab.data import inspect_report, load_examples, render_example, tokenize_examples
from tunelab.data.records import sidecar_path
from tunelab.data.tool_render import chat_view, renders_tools
from tunelab.data.tools import RESPONSE_OPEN, TOOLS_HEADER
from tunelab.errors import DataError
from tunelab.models.tiny import build_tiny_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}

# A Qwen 2.5-style template (written here) that renders tools, calls and results itself.
NATIVE_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'assistant' and not m.tool_calls) %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{%- elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}"
    "{%- for c in m.tool_calls %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "\n<tool_response>\n{{ m.content }}\n</tool_response>"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def conversation(args_a="{\"city\": \"Paris\"}", args_b=None) -> dict:
    """Two rounds: two parallel calls (string and object arguments), their results out of order, one more
    call, its result, then the final answer."""
    return {"tools": [WEATHER, TIME], "messages": [
        {"role": "system", "content": "You help travellers."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": args_a}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": args_b or {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "c2", "content": "RESULT-ROME"},
        {"role": "tool", "tool_call_id": "c1", "content": "RESULT-PARIS"},
        {"role": "assistant", "content": "Checking the time too.", "tool_calls": [
            {"id": "c3", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c3", "content": "RESULT-TIME"},
        {"role": "assistant", "content": "FINAL: Paris mild, Rome warm."},
    ]}


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def trained_text(example, tokenizer) -> tuple[str, str]:
    runs = render_example(example, tokenizer)
    return "".join(t for t, on in runs if on), "".join(t for t, on in runs if not on)


@pytest.fixture(scope="module")
def chatml():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def native():
    return build_tiny_tokenizer(chat_template=NATIVE_TEMPLATE)


def test_valid_record_normalised_string_and_object_arguments(tmp_path):
    [ex] = load_examples([write_jsonl(tmp_path / "t.jsonl", [conversation()])])
    calls = ex.messages[2]["tool_calls"]
    assert [c["function"]["arguments"] for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]
    assert ex.messages[2]["content"] == ""
    assert ex.messages[3] == {"role": "tool", "content": "RESULT-ROME", "tool_call_id": "c2", "name": "get_weather"}
    assert [t["function"]["name"] for t in ex.tools] == ["get_weather", "get_time"]


def test_fallback_trains_calls_and_answers_not_results_nor_tools(tmp_path, chatml):
    assert not renders_tools(chatml)
    [ex] = load_examples([write_jsonl(tmp_path / "t.jsonl", [conversation()])])
    trained, untrained = trained_text(ex, chatml)
    assert trained.count("<tool_call>") == 3 and '"arguments": {"city": "Rome"}' in trained
    assert "Checking the time too." in trained and "FINAL: Paris mild, Rome warm." in trained
    listing = '{"type": "function", "function": {"name": "get_time"'
    assert "RESULT" not in trained and listing in untrained and listing not in trained
    assert TOOLS_HEADER.splitlines()[0] in untrained and "RESULT-TIME" in untrained
    # Results are rendered in the order of the calls they answer (ids are not rendered).
    assert untrained.index("RESULT-PARIS") < untrained.index("RESULT-ROME")
    _, stats = tokenize_examples([ex], chatml, max_length=4096)
    assert stats.tool_calls == 3 and stats.tool_rendering == "fallback"
    assert set(stats.trained_by_role) == {"assistant"} and stats.tokens_by_role["tool"] > 0


def test_inspect_shows_tool_calls_and_untrained_results(tmp_path, chatml):
    [ex] = load_examples([write_jsonl(tmp_path / "t.jsonl", [conversation()])])
    _, stats = tokenize_examples([ex], chatml, max_length=4096)
    assert stats.truncated == 0
    console = Console(record=True, no_color=True, width=200)
    inspect_report(stats, render_example(ex, chatml), console, title="train")
    out = console.export_text()
    assert "tool calls" in out and "3 (fallback: tools in the system turn, calls in <tool_call> tags" in out
    assert "[[FINAL: Paris mild, Rome warm.<|im_end|>]]" in out and "[[RESULT" not in out
    rows = {cells[1].strip(): cells for cells in (line.split("│") for line in out.splitlines()) if len(cells) == 7}
    assert rows["tool"][4].strip() == "0" and rows["system"][4].strip() == "0"  # results, tools listing: not trained
    assert int(rows["assistant"][4].strip()) > 0


def test_native_template_renders_tools_itself(tmp_path, native):
    assert renders_tools(native)
    [ex] = load_examples([write_jsonl(tmp_path / "t.jsonl", [conversation()])])
    view = chat_view(ex.messages, ex.tools, native)
    assert view.tools == list(ex.tools) and view.messages[3]["role"] == "tool"
    trained, untrained = trained_text(ex, native)
    assert trained.count("<tool_call>") == 3 and "FINAL" in trained and "RESULT" not in trained
    assert "<tools>" in untrained and RESPONSE_OPEN in untrained
    _, stats = tokenize_examples([ex], native)
    assert stats.tool_rendering == "native" and "tool" not in stats.trained_by_role


def test_tools_with_plain_messages_are_rendered_not_dropped(tmp_path, chatml):
    record = {"tools": [WEATHER], "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    [ex] = load_examples([write_jsonl(tmp_path / "t.jsonl", [record])])
    trained, untrained = trained_text(ex, chatml)
    assert "get_weather" in untrained and "get_weather" not in trained and "Hello" in trained


def test_sidecar_tools_apply_to_records_without_their_own(tmp_path, chatml):
    plain = conversation()
    del plain["tools"]
    path = write_jsonl(tmp_path / "calls.jsonl", [plain])
    sidecar = sidecar_path(path)
    assert sidecar == tmp_path / "calls.tools.json"
    with pytest.raises(DataError, match="the record has no tools"):
        load_examples([path])
    sidecar.write_text(json.dumps([WEATHER, TIME]), encoding="utf-8")
    [ex] = load_examples([path])
    assert len(ex.tools) == 2


def test_list_of_text_parts_is_joined(tmp_path):
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "Hi!"}]}]}
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "t.jsonl", [record])
    [ex] = load_examples([path])
    assert ex.messages == ({"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"})
    with pytest.raises(DataError, match="content part 1: image file .*x not found"):
        load_examples([write_jsonl(tmp_path / "i.jsonl", [image])])


def _broken(edit) -> dict:
    record = copy.deepcopy(conversation())
    edit(record["messages"])
    return record


def test_every_problem_reported_with_file_and_line(tmp_path):
    def unknown(m):
        m[2]["tool_calls"][0]["function"]["name"] = "get_wether"

    def not_json(m):
        m[2]["tool_calls"][0]["function"]["arguments"] = "{city: Paris"

    def schema(m):
        m[2]["tool_calls"][1]["function"]["arguments"] = {"city": 3, "unit": "K"}

    def orphan(m):
        m.insert(1, {"role": "tool", "content": "stray"})

    def mismatch(m):
        m[3]["tool_call_id"] = "c9"

    def on_user(m):
        m[1]["tool_calls"] = copy.deepcopy(m[2]["tool_calls"])

    def unanswered(m):
        del m[3]

    records = [conversation()] + [_broken(e) for e in (unknown, not_json, schema, orphan, mismatch, on_user, unanswered)]
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError) as excinfo:
        load_examples([path])
    problems = excinfo.value.problems
    expected = [
        (2, "message 3 tool call 1 calls 'get_wether', which is not in tools (get_weather, get_time); did you mean 'get_weather'?"),
        (3, "message 3 tool call 1: arguments are not valid JSON"),
        (4, "message 3 tool call 2: arguments break the schema of 'get_weather': "),
        (5, "message 2 (tool) answers no call"),
        (6, "message 4 (tool): tool_call_id 'c9' matches no unanswered call of message 3 (its ids: 'c1', 'c2')"),
        (7, "message 2 has tool_calls but its role is 'user'; only assistant messages call tools"),
        (8, "message 3: call(s) 'get_weather' (id 'c2') get no tool message before message 5"),
    ]
    for line, text in expected:
        assert any(p.startswith(f"{path}:{line}: {text}") for p in problems), (line, text, problems)
    assert not any(p.startswith(f"{path}:1:") for p in problems)
    assert len(problems) >= len(expected)
    schema_problem = next(p for p in problems if p.startswith(f"{path}:4:"))
    assert "(and 1 more)" in schema_problem


def test_bad_tool_definitions_and_sidecar(tmp_path):
    bad_schema = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
    records = [{**conversation(), "tools": [WEATHER, bad_schema]}, {**conversation(), "tools": "not json"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError) as excinfo:
        load_examples([path])
    text = "\n".join(excinfo.value.problems)
    assert f"{path}:1: field 'tools': tool 2 ('f'): parameters is not a valid JSON schema" in text
    assert f"{path}:2: field 'tools' is a string but not valid JSON" in text
    plain = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    sidecar_path(plain).write_text('[\n{"type": "function",\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"p\.tools\.json:3: not valid JSON"):
        load_examples([plain])


def test_tiny_sft_trains_on_tool_records(tmp_path, tiny_llama):
    from tunelab.recipes import sft
    from tunelab.resolve import load_config

    records = []
    for i in range(8):
        record = conversation(args_a=json.dumps({"city": f"Town{i}"}))
        records.append(record)
    train = write_jsonl(tmp_path / "tools.jsonl", records)
    config = load_config(None, [f"model={tiny_llama}", f"data.train={train}", f"output_dir={tmp_path / 'run'}",
                                "method.name=lora", "method.r=4", "train.batch_size=4", "train.max_steps=2",
                                "train.warmup_ratio=0", "data.max_length=2048", "eval.before=false", "eval.probe=false"])
    done = sft.main(config)
    assert done.steps == 2
