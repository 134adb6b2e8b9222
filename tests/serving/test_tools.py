"""Tool calls and structured outputs through the official ``openai`` client against a live ``tunelab serve``:
forced calls always parse and follow the function's schema, streamed calls reassemble to the non-streamed ones,
``response_format`` answers validate against their schema, an agent loop runs end to end, and bad requests get
400s. Both schedulers (continuous, dynamic) run every API test on a tiny random llama (its context raised so the
tools listing fits); the agent loop and ``json_object`` use the embedded SmolLM2, whose answers end by themselves."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tunelab.models.tiny import save_tiny_model

PICK = {"type": "function", "function": {
    "name": "pick", "description": "Pick a colour and a count",
    "parameters": {"type": "object", "properties": {"colour": {"enum": ["red", "blue", "green"]},
                                                    "n": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["colour", "n"], "additionalProperties": False}}}
FLAG = {"type": "function", "function": {
    "name": "flag", "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"],
                                   "additionalProperties": False}}}
# Every value bounded, so even a random model's answer ends within max_tokens.
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["label", "score", "ok", "tags"],
          "properties": {"label": {"enum": ["cat", "dog", "bird"]}, "score": {"type": "integer", "minimum": -5, "maximum": 500},
                         "ok": {"type": "boolean"}, "word": {"type": "string", "maxLength": 6},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}
ASK = [{"role": "user", "content": "Colour 3?"}]


@pytest.fixture(scope="module")
def tools_registry(tmp_path_factory):
    from tunelab.serving.models import Registry

    path = save_tiny_model(tmp_path_factory.mktemp("tiny-tools"), "llama")
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 2048  # rope positions: the fallback's tools listing alone is ~570 tokens
    (path / "config.json").write_text(json.dumps(config))
    return Registry(str(path), base_id="tiny")


@pytest.fixture(scope="module", params=["continuous", "dynamic"])
def tiny_client(tools_registry, request):
    from openai import OpenAI

    from tunelab.serving.app import create_app
    from tunelab.serving.server import BackgroundServer

    with BackgroundServer(create_app(tools_registry, batching=request.param)) as url:
        yield OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()]


def test_a_forced_call_parses_and_follows_the_schema(tiny_client):
    for choice, seed in [("required", 0), ({"type": "function", "function": {"name": "flag"}}, 1)]:
        answer = tiny_client.chat.completions.create(model="tiny", messages=ASK, tools=[PICK, FLAG], tool_choice=choice,
                                                     parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=120)
        choice0 = answer.choices[0]
        assert choice0.finish_reason == "tool_calls" and choice0.message.content is None
        [(name, arguments)] = _calls(choice0.message)
        schema = {"pick": PICK, "flag": FLAG}[name]["function"]["parameters"]
        jsonschema.validate(arguments, schema)
        assert choice0.message.tool_calls[0].id.startswith("call_")
        if isinstance(choice, dict):
            assert name == "flag"


def test_streamed_tool_calls_reassemble_to_the_non_streamed_ones(tiny_client):
    ask = dict(model="tiny", messages=ASK, tools=[PICK, FLAG], tool_choice="required", parallel_tool_calls=False,
               temperature=0, max_tokens=200)
    whole = tiny_client.chat.completions.create(**ask)
    with tiny_client.chat.completions.stream(**ask) as events:
        streamed = events.get_final_completion()
    assert streamed.choices[0].finish_reason == whole.choices[0].finish_reason == "tool_calls"
    assert _calls(streamed.choices[0].message) == _calls(whole.choices[0].message)
    assert len(whole.choices[0].message.tool_calls) == 1


def test_json_schema_answers_always_validate(tiny_client):
    fmt = {"type": "json_schema", "json_schema": {"name": "animal", "schema": SCHEMA, "strict": True}}
    for seed in range(10):
        answer = tiny_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"Colour {seed}?"}],
                                                     response_format=fmt, temperature=1.0, seed=seed, max_tokens=200)
        assert answer.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(answer.choices[0].message.content), SCHEMA)


def test_a_conversation_with_calls_and_results_is_accepted(tiny_client):
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "pick", "arguments": '{"colour": "red", "n": 3}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    answer = tiny_client.chat.completions.create(model="tiny", messages=history, tools=[PICK], tool_choice="none",
                                                 temperature=0, max_tokens=8)
    assert answer.choices[0].message.tool_calls is None and isinstance(answer.choices[0].message.content, str)


def test_auto_answers_are_read_as_evaluation_reads_them(tiny_client, tools_registry):
    """``auto``: the served answer is the greedy text ``tunelab eval`` generates for the same prompt, read by the same
    parser (tool_parse), so the calls (and content) agree."""
    from tunelab.data.tool_render import render_chat
    from tunelab.evaluation.generate import generate_answers
    from tunelab.serving.toolcalls import openai_calls

    served = tools_registry.get("tiny")
    with served.active() as module:
        [text] = generate_answers(module, served.tokenizer, [render_chat(served.tokenizer, ASK, [PICK], add_generation_prompt=True)],
                                  max_new_tokens=12)
    answer = tiny_client.chat.completions.create(model="tiny", messages=ASK, tools=[PICK], temperature=0, max_tokens=12)
    content, calls = openai_calls(text)
    assert _calls(answer.choices[0].message) == [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    assert (answer.choices[0].message.content or "").strip() == (content or "").strip()


def test_a_served_call_is_tool_parses_reading_of_the_constrained_text(tiny_client, tools_registry):
    """The served (greedy, forced) call equals :func:`parse_tool_calls` of the text the same grammar gives ``generate``."""
    from tunelab.data.tool_parse import parse_tool_calls
    from tunelab.data.tool_render import render_chat
    from tunelab.generation import SamplingSettings, generate
    from tunelab.serving.protocol import ChatRequest
    from tunelab.serving.structured import plan_for

    served = tools_registry.get("tiny")
    fields = dict(model="tiny", messages=ASK, tools=[PICK, FLAG], tool_choice="required", parallel_tool_calls=False)
    plan = plan_for(ChatRequest(**fields), served.tokenizer)
    with served.active() as module:
        [done] = generate(module, served.tokenizer, [render_chat(served.tokenizer, ASK, [PICK, FLAG], add_generation_prompt=True)],
                          SamplingSettings(max_new_tokens=200), constraints=[plan.grammar])
    parsed = parse_tool_calls(done.text)
    assert not parsed.problems and len(parsed.calls) == 1
    answer = tiny_client.chat.completions.create(**fields, temperature=0, max_tokens=200)
    assert _calls(answer.choices[0].message) == [(c["name"], c["arguments"]) for c in parsed.calls]


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}]}, "tools"),
    ({"tools": [PICK], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [PICK], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [PICK] * 129}, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}},
     "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
])
def test_unusable_tools_and_formats_are_400s(tiny_client, fields, param):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        tiny_client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, **fields)
    assert caught.value.status_code == 400 and caught.value.body["param"] == param


# --- the embedded SmolLM2: answers that end by themselves ------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def smol_registry():
    from tunelab.serving.models import Registry

    return Registry("smollm2-135m-instruct", base_id="smol")


@pytest.fixture(scope="module", params=["continuous", "dynamic"])
def smol_client(smol_registry, request):
    from openai import OpenAI

    from tunelab.serving.app import create_app
    from tunelab.serving.server import BackgroundServer

    with BackgroundServer(create_app(smol_registry, batching=request.param)) as url:
        yield OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)


def get_weather(city: str) -> str:
    return f"It is 18 degrees and sunny in {city}."


def test_an_agent_loop_with_the_openai_client(smol_client):
    """ask -> tool_calls -> run the Python function -> send the tool message -> the final answer."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = smol_client.chat.completions.create(model="smol", messages=messages, tools=[WEATHER], temperature=0, max_tokens=40,
                                                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert first.choices[0].finish_reason == "tool_calls"
    call = first.choices[0].message.tool_calls[0]
    result = {"get_weather": get_weather}[call.function.name](**json.loads(call.function.arguments))
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": result}]
    final = smol_client.chat.completions.create(model="smol", messages=messages, tools=[WEATHER], temperature=0, max_tokens=60)
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content.strip()


def test_json_object_answers_parse(smol_client):
    answer = smol_client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Give a JSON object describing a cat, with keys name and age."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=60)
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
