"""The shop tool task in OpenAI format: same gold calls as the plain task, typed arguments valid against the tools'
schemas, follow-up rounds that agree with the shop functions, committed files fresh, records loading as tool chats."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tunelab.data import load_examples
from tunelab.evaluation.metrics import score
from tunelab.evaluation.tool_metrics import tool_reference
from tunelab.examples.toolcall import openai_format as oa
from tunelab.examples.toolcall import task
from tunelab.resolve import load_config

PRESET = "configs/smollm2-135m-instruct/sft_lora_tools.yaml"


@pytest.fixture(scope="module")
def splits():
    return oa.make_splits()


def _call(record: dict) -> dict:
    calls = [m for m in record["messages"] if m.get("tool_calls")]
    assert len(calls) == 1 and len(calls[0]["tool_calls"]) == 1
    return calls[0]["tool_calls"][0]["function"]


def test_calls_are_the_plain_tasks_calls_typed_and_schema_valid(splits):
    plain = task.make_splits(180, 60, 0)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in oa.TOOLS}
    for records, originals in zip(splits, plain):
        assert len(records) == len(originals)
        for record, original in zip(records, originals):
            call = _call(record)
            assert task.format_call(call["name"], {k: (f"{v:.2f}" if k == "amount" else v)
                                                   for k, v in call["arguments"].items()}) == task.call_of(original)
            jsonschema.validate(call["arguments"], schemas[call["name"]])
            assert record["messages"][1] == original["messages"][1]  # the same request
            assert "tool call" not in record["messages"][0]["content"]  # no format instructions: the tools say it


def test_follow_ups_carry_the_functions_result_and_answer(splits):
    train, test = splits
    follow = [r for r in train if r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"]]
    assert len(follow) == len(train) // oa.FOLLOW_UP_EVERY
    for record in follow:
        call, tool_message, answer = record["messages"][2]["tool_calls"][0], record["messages"][3], record["messages"][4]
        result = oa.FUNCTIONS[call["function"]["name"]](**call["function"]["arguments"])
        assert tool_message == {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)}
        assert answer["content"] == oa.answer_for(call["function"]["name"], result)
    assert all(len(r["messages"]) == 3 for r in test)  # the test split is scored on the call


def test_committed_files_are_fresh(splits):
    for name, rows in zip(("train.jsonl", "test.jsonl"), splits):
        path = oa.HERE / name
        assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows, (
            f"{name} is stale: python -m tunelab.examples.toolcall.openai_format")
        assert json.loads(path.with_suffix(".tools.json").read_text(encoding="utf-8")) == oa.TOOLS


def test_records_load_with_the_sidecar_tools_and_score_with_the_metric():
    examples = load_examples([str(oa.HERE / "test.jsonl")])
    assert len(examples) == 60 and all(e.tools and len(e.tools) == 6 for e in examples)
    gold = [json.loads(tool_reference(e.messages[-1], e.tools)) for e in examples[:4]]
    predictions = ['<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>'
                   % (g["tool_calls"][0]["name"], json.dumps(g["tool_calls"][0]["arguments"])) for g in gold]
    references = [tool_reference(e.messages[-1], e.tools) for e in examples[:4]]
    assert score("tool_call", predictions, references).score == 1.0
    assert score("tool_call", ["I cannot help."] * 4, references).score == 0.0


def test_preset_loads():
    config = load_config(PRESET)
    assert config.eval.metric == "tool_call" and config.data.train.endswith("openai/train.jsonl")
