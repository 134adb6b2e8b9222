"""Tool calls read back from model output, the ``tool_call`` metric and the ``tool_call`` GRPO reward."""

from __future__ import annotations

import json

import pytest

from tunelab.data.records import Example
from tunelab.data.tool_parse import parse_tool_calls, plain_calls
from tunelab.data.tool_render import format_call
from tunelab.errors import TunelabError
from tunelab.evaluation.metrics import score, uses_tool_reference
from tunelab.evaluation.run import split_example
from tunelab.evaluation.tool_metrics import score_calls, tool_reference
from tunelab.rewards.functions import RewardSet, reward_names

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}]


def _block(name: str, arguments: dict) -> str:
    return format_call({"function": {"name": name, "arguments": arguments}})


def _ref(calls: list[dict], tools=TOOLS, content: str = "") -> str:
    message = {"role": "assistant", "content": content,
               "tool_calls": [{"type": "function", "function": c} for c in calls]}
    return tool_reference(message, tools)


# ---- parser ----

def test_parse_one_call():
    out = parse_tool_calls(_block("get_weather", {"city": "Paris"}))
    assert out == ("", [{"name": "get_weather", "arguments": {"city": "Paris"}}], [])


def test_parse_parallel_calls_and_text():
    text = "Let me check.\n" + _block("get_weather", {"city": "Paris"}) + "\n" + _block("get_weather", {"city": "Rome"})
    out = parse_tool_calls(text)
    assert out.text == "Let me check."
    assert [c["arguments"]["city"] for c in out.calls] == ["Paris", "Rome"]
    assert out.problems == []


def test_parse_malformed_block_is_a_problem_not_a_crash():
    text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": }\n</tool_call>\n" + _block("f", {})
    out = parse_tool_calls(text)
    assert out.calls == [{"name": "f", "arguments": {}}]
    assert len(out.problems) == 1 and "not valid JSON" in out.problems[0]
    assert parse_tool_calls("<tool_call>[1, 2]</tool_call>").problems[0].startswith("tool call block 1 is")
    assert "no function name" in parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>').problems[0]


def test_parse_unclosed_last_block_and_string_arguments():
    out = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}')
    assert out.calls == [{"name": "f", "arguments": {"x": 1}}]


def test_parse_bare_json_llama_style():
    out = parse_tool_calls('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}')
    assert out.calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    fenced = '```json\n[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"k": true}}]\n```'
    assert [c["name"] for c in parse_tool_calls(fenced).calls] == ["a", "b"]


def test_parse_no_call():
    assert parse_tool_calls("It is 18 C in Paris.") == ("It is 18 C in Paris.", [], [])
    # JSON that is not a call (structured output) stays text
    assert parse_tool_calls('{"city": "Paris"}').calls == []


def test_plain_calls_reads_openai_and_flat_forms():
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}, {"name": "g", "arguments": {}}]
    assert plain_calls(calls) == [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]
    assert plain_calls(None) == []
    with pytest.raises(ValueError, match="no function name"):
        plain_calls([{"arguments": {}}])


# ---- metric ----

def test_metric_exact_and_wrong_name():
    ref = _ref([{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}])
    right = _block("get_weather", {"unit": "C", "city": "Paris"})  # argument order is irrelevant
    wrong = _block("get_forecast", {"city": "Paris", "unit": "C"})
    result = score("tool_call", [right, wrong], [ref, ref])
    assert result.per_example == [1.0, 0.0]
    assert result.details[0]["schema_valid"] is True and result.details[0]["decision"] == "right"
    assert result.details[1]["names"] == 0.0 and result.details[1]["partial"] == 0.0
    assert result.details[1]["schema_valid"] is False  # get_forecast is not a tool


def test_metric_one_argument_wrong_gives_partial_credit():
    ref = _ref([{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}])
    exact, details = score_calls(_block("get_weather", {"city": "Paris", "unit": "F"}), *_expected(ref))
    assert exact == 0.0
    assert details["names"] == 1.0 and details["arguments"] == 0.0 and details["argument_credit"] == 0.5
    assert details["partial"] == pytest.approx(0.75)


def _expected(reference: str):
    value = json.loads(reference)
    return plain_calls(value["tool_calls"]), value["tools"]


def test_metric_numbers_normalised_and_parallel_order_free():
    ref = _ref([{"name": "f", "arguments": {"n": 3}}, {"name": "g", "arguments": {"x": [1, {"a": 2}]}}], tools=None)
    pred = _block("g", {"x": [1.0, {"a": 2}]}) + "\n" + _block("f", {"n": 3.0})
    result = score("tool_call", [pred], [ref])
    assert result.per_example == [1.0] and result.details[0]["schema_valid"] is None


def test_metric_many_parallel_calls_paired_greedily():
    calls = [{"name": "f", "arguments": {"i": i}} for i in range(8)]
    pred = "\n".join(_block(c["name"], c["arguments"]) for c in reversed(calls))
    assert score("tool_call", [pred], [_ref(calls, tools=None)]).per_example == [1.0]


def test_metric_extra_call_is_not_exact():
    ref = _ref([{"name": "get_weather", "arguments": {"city": "Paris"}}])
    pred = _block("get_weather", {"city": "Paris"}) + "\n" + _block("get_weather", {"city": "Rome"})
    exact, details = score_calls(pred, *_expected(ref))
    assert exact == 0.0 and details["arguments"] == 1.0 and details["partial"] == pytest.approx(0.5)


def test_metric_answer_expected():
    ref = tool_reference({"role": "assistant", "content": "Hello!"}, TOOLS)
    result = score("tool_call", ["Hi there", _block("get_weather", {"city": "Paris"})], [ref, ref])
    assert result.per_example == [1.0, 0.0]
    assert result.details[1]["decision"] == "called instead of answering"


def test_metric_call_expected_but_answered():
    ref = _ref([{"name": "get_weather", "arguments": {"city": "Paris"}}])
    result = score("tool_call", ["It is sunny."], [ref])
    assert result.per_example == [0.0] and result.details[0]["decision"] == "answered instead of calling"


def test_metric_flags_schema_violation():
    ref = _ref([{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}])
    result = score("tool_call", [_block("get_weather", {"city": "Paris", "unit": "K"})], [ref])
    details = result.details[0]
    assert details["schema_valid"] is False and "'K' is not one of" in details["schema_errors"][0]


def test_metric_reads_plain_text_references():
    assert score("tool_call", [_block("f", {})], [_block("f", {})]).per_example == [1.0]
    assert score("tool_call", ["fine"], ["an answer"]).per_example == [1.0]
    with pytest.raises(TunelabError, match="tool_calls cannot be read"):
        score("tool_call", ["x"], ['{"tool_calls": [{"arguments": {}}]}'])


def test_split_example_gives_the_tool_reference():
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    example = Example(({"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]}),
                      "t:1", tuple(TOOLS))
    assert uses_tool_reference("tool_call") and not uses_tool_reference("exact_match")
    conversation, reference = split_example(example, tool_reference=True)
    assert conversation == [{"role": "user", "content": "Weather?"}]
    assert json.loads(reference)["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert split_example(example)[1] == _block("get_weather", {"city": "Paris"})  # text metrics: the fallback text


# ---- reward ----

def test_tool_call_reward_gives_partial_credit():
    assert "tool_call" in reward_names()
    expected = [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]
    completions = [_block("get_weather", {"city": "Paris", "unit": "C"}), _block("get_weather", {"city": "Paris", "unit": "F"}),
                   _block("other", {}), "no call", "no call"]
    fields = {"tool_calls": [expected] * 4 + [None]}
    scores = RewardSet([{"fn": "tool_call"}]).check(completions, ["q"] * 5, fields)["tool_call"]
    assert scores == pytest.approx([1.0, 0.75, 0.0, 0.0, 1.0])


def test_tool_call_reward_names_a_missing_field():
    with pytest.raises(TunelabError, match="tool_calls"):
        RewardSet([{"fn": "tool_call"}]).check(["x"], ["q"], {"answer": ["y"]})


# ---- the evaluation path ----

def test_eval_renders_tools_as_training_and_records_details():
    from tunelab.data.tools import TOOLS_HEADER
    from tunelab.evaluation.run import LoadedModel, eval_prompt, evaluate
    from tunelab.models.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()  # ChatML without tools: the fallback renders them
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    examples = [Example(({"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]}),
                        "t:1", tuple(TOOLS)),
                Example(({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}), "t:2", tuple(TOOLS))]
    prompt = eval_prompt(tokenizer, examples[0], list(examples[0].messages[:1]))
    assert isinstance(prompt, str) and TOOLS_HEADER in prompt and prompt.rstrip().endswith("assistant")
    report = evaluate(LoadedModel(build_tiny_model(), tokenizer, "tiny"), examples, "tool_call", max_new_tokens=3)
    assert report["metric"] == "tool_call" and len(report["examples"]) == 2
    first, second = report["examples"]
    assert json.loads(first["reference"])["tool_calls"][0]["name"] == "get_weather"
    assert first["score"] == 0.0 and first["details"]["decision"] == "answered instead of calling"
    assert second["details"]["expected_calls"] == 0
