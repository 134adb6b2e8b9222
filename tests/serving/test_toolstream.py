"""Reading tool calls out of answers and holding them back in streams (:mod:`tunelab.serving.toolcalls`), and the
tool-call grammar (:mod:`tunelab.serving.structured`), without a server."""

from __future__ import annotations

import json

import pytest

from tunelab.data.tool_parse import parse_tool_calls
from tunelab.generation import Completion
from tunelab.serving.structured import MAX_PARALLEL_CALLS, Plan, call_grammar
from tunelab.serving.toolcalls import ToolStream, answer_of, openai_calls

CALL = '<tool_call>\n{"name": "pick", "arguments": {"colour": "red"}}\n</tool_call>'
TEXTS = ["Let me look.\n" + CALL, CALL + "\n" + CALL.replace("red", "blue"), "Plain answer <tool not a call", "  spaced answer",
         '{"name": "pick", "arguments": {"colour": "red"}}', "Sure.\n<tool_call>\n{broken\n</tool_call>"]


@pytest.mark.parametrize("text", TEXTS)
def test_a_stream_reassembles_to_the_whole_answer(text):
    plan = Plan(tools=[{}], parse=True)
    stream, sent = ToolStream(plan), []
    for k in range(0, len(text), 3):  # deltas of three characters
        sent.append(stream.feed(text[k:k + 3]))
    chunks, finish = stream.finish("id", "m", "stop")
    calls = {}
    for chunk in chunks:
        delta = chunk["choices"][0]["delta"]
        sent.append(delta.get("content", ""))
        for part in delta.get("tool_calls", ()):
            entry = calls.setdefault(part["index"], {"name": "", "arguments": ""})
            entry["name"] += part.get("function", {}).get("name", "")
            entry["arguments"] += part["function"].get("arguments", "")
    message, whole_finish = answer_of(plan)(Completion([], text, "stop", 0))
    assert finish == whole_finish
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", ())]
    assert "".join(sent) == (message["content"] or "")
    if message.get("tool_calls"):
        assert "<tool_call>" not in "".join(sent) and finish == "tool_calls"


def test_served_calls_are_tool_parses_calls():
    for text in TEXTS:
        _, calls = openai_calls(text)
        expected = parse_tool_calls(text).calls
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
            [(c["name"], c["arguments"]) for c in expected]


def test_the_call_grammar_accepts_the_training_format_and_bounds_parallel_calls():
    import llguidance.hf
    from llguidance import LLMatcher

    from tunelab.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    functions = [{"name": "pick", "parameters": {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}}}}]
    ll = llguidance.hf.from_tokenizer(tokenizer)

    def accepts(grammar, text: str) -> bool:
        matcher = LLMatcher(ll, grammar.text, log_level=0)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()

    assert accepts(call_grammar(functions, parallel=False), CALL)
    assert not accepts(call_grammar(functions, parallel=False), CALL + "\n" + CALL)
    assert accepts(call_grammar(functions, parallel=True), "\n".join([CALL] * MAX_PARALLEL_CALLS))
    assert not accepts(call_grammar(functions, parallel=True), "\n".join([CALL] * (MAX_PARALLEL_CALLS + 1)))
    assert not accepts(call_grammar(functions, parallel=False), CALL.replace("red", "green"))
