"""Tools and structured outputs of a chat request: what the prompt lists, whether tool calls are read out of
the answer, and the grammar that constrains decoding (:mod:`tunelab.generation.constrain`, llguidance).

``tool_choice`` (OpenAI's semantics; the default is ``auto`` with tools, ``none`` without):

* ``auto``: the tools are rendered into the prompt, the model answers freely, and its text is read with
  :func:`tunelab.data.tool_parse.parse_tool_calls`, the parser of ``tunelab eval``'s ``tool_call`` metric, so a
  served call is the call evaluation scores.
* ``none``: the tools are still rendered (the conversation may hold earlier calls, and the model should see
  what they were), but no call is read out: the answer is text (as vLLM does).
* ``required`` / ``{"type": "function", "function": {"name": ...}}``: decoding is constrained to tool-call
  blocks in the format training renders (``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
  :mod:`tunelab.data.tools`), whose ``arguments`` follow the function's parameter schema: every answer parses.
  ``required`` allows one call or, with ``parallel_tool_calls`` (OpenAI's default true), up to
  :data:`MAX_PARALLEL_CALLS`; a named function is called exactly once.

``response_format``: ``text``, ``json_object`` (any JSON object) or ``json_schema`` (``{"json_schema": {"name",
"schema"}}``), enforced by the grammar; with a forced tool call the call's grammar wins, and with ``auto`` tools
an answer constrained to JSON is not read for calls. Generation that reaches ``max_tokens`` first is cut off
and need not parse (``finish_reason: length``), as with OpenAI.

Limits (400, ``param`` naming the field): at most :data:`MAX_TOOLS` tools, :data:`MAX_SCHEMA_CHARS` characters
of tools plus schema, and a grammar within llguidance's size and lexer-fuel bounds (compiled in milliseconds:
a schema over those bounds is refused at once rather than stalling the decoding thread).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from jinja2 import TemplateError

from tunelab.data.tool_render import render_chat, uses_tools
from tunelab.data.tools import CALL_CLOSE, CALL_OPEN, parse_tools
from tunelab.errors import TunelabError
from tunelab.generation.constrain import Grammar, grammar_problem, json_rule, json_schema_grammar, lark_grammar
from tunelab.generation.stops import end_of_turn_ids
from tunelab.serving.protocol import APIError, ChatRequest

MAX_TOOLS = 128  # OpenAI's bound
MAX_SCHEMA_CHARS = 65536  # the tools' JSON plus the response schema
MAX_PARALLEL_CALLS = 8  # calls one forced answer may hold


@dataclass(frozen=True)
class Plan:
    """How one chat request is rendered, decoded and read.

    Attributes:
        tools: The tools the prompt lists, or None.
        parse: Read tool calls out of the answer.
        forced: Decoding is constrained to tool calls (``required`` or a named function): no text is streamed.
        grammar: The grammar decoding follows, or None (free text).
    """

    tools: list[dict] | None = None
    parse: bool = False
    forced: bool = False
    grammar: Grammar | None = None


def plan_for(body: ChatRequest, tokenizer) -> Plan:
    """Check ``tools``, ``tool_choice`` and ``response_format`` and decide how to answer (module docstring).

    Raises:
        APIError: 400 for a bad tools list, a ``tool_choice`` naming no tool, or an unusable ``response_format``.
    """
    tools = _tools(body.tools)
    choice = _choice(body.tool_choice, tools)
    schema = _response_schema(body.response_format)
    grammar, forced = None, choice not in ("auto", "none")
    if forced:
        functions = [t["function"] for t in tools if choice == "required" or t["function"]["name"] == choice]
        grammar = _checked(call_grammar(functions, body.parallel_tool_calls is not False and choice == "required"),
                           tokenizer, "tools")
    elif schema is not None:
        grammar = _checked(json_schema_grammar(schema), tokenizer, "response_format")
    return Plan(tools=list(tools) or None, parse=bool(tools) and choice != "none" and (forced or schema is None),
                forced=forced, grammar=grammar)


def render(tokenizer, conversation: list[dict], plan: Plan) -> list[dict] | str:
    """The prompt: the conversation as it is when it has no tools (the scheduler renders it), else its text
    rendered as training renders it (:func:`tunelab.data.tool_render.render_chat`).

    Raises:
        APIError: 400 when the chat template refuses the conversation.
    """
    if not uses_tools(conversation, plan.tools):
        return conversation
    try:
        return render_chat(tokenizer, conversation, plan.tools, add_generation_prompt=True)
    except (TunelabError, TemplateError, KeyError, TypeError) as exc:
        raise APIError(400, f"the chat template cannot render these messages with tools: {exc}", param="messages") from None


def call_grammar(functions: list[dict], parallel: bool) -> Grammar:
    """Tool-call blocks (``<tool_call>\\n{json}\\n</tool_call>``, newline-separated) calling one of ``functions``
    with arguments valid under its parameter schema; one block, or up to :data:`MAX_PARALLEL_CALLS`."""
    defs: dict = {}
    options = [_call_schema(f, defs) for f in functions]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    if defs:
        schema = {**schema, "$defs": defs}
    more = f' ("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
    return lark_grammar(f"start: call{more}\n"
                        f"call: {json.dumps(CALL_OPEN + chr(10))} body {json.dumps(chr(10) + CALL_CLOSE)}\n"
                        f"body: {json_rule(schema)}\n")


def _call_schema(function: dict, defs: dict) -> dict:
    """``{"name": const, "arguments": parameters}``; the parameters' ``$defs`` move to the root, where their
    ``#/$defs/...`` references resolve."""
    parameters = dict(function.get("parameters") or {})
    for key in ("$defs", "definitions"):
        for name, sub in (parameters.pop(key, None) or {}).items():
            if name in defs and defs[name] != sub:
                raise APIError(400, f"tools: two functions define $defs '{name}' differently; forced tool calls need "
                                    "distinct definition names", param="tools")
            defs[name] = sub
    if "#/definitions/" in (text := json.dumps(parameters)):  # the definitions now sit under the root's $defs
        parameters = json.loads(text.replace('"#/definitions/', '"#/$defs/'))
    parameters.pop("$schema", None)
    parameters.setdefault("type", "object")
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def _tools(value) -> tuple[dict, ...]:
    if value is None:
        return ()
    if isinstance(value, list) and len(value) > MAX_TOOLS:
        raise APIError(400, f"tools: {len(value)} tools were sent; at most {MAX_TOOLS} are allowed", param="tools")
    if len(json.dumps(value)) > MAX_SCHEMA_CHARS:
        raise APIError(400, f"tools: the definitions are longer than {MAX_SCHEMA_CHARS} characters of JSON; "
                            "send fewer or smaller tools", param="tools")
    tools, problems = parse_tools(value, "tools")
    if problems:
        raise APIError(400, "; ".join(problems), param="tools")
    return tools or ()


def _choice(value, tools: tuple[dict, ...]) -> str:
    """``auto``, ``none``, ``required`` or the name of the function to call."""
    if value is None:
        return "auto" if tools else "none"
    name = value
    if isinstance(value, dict):
        function = value.get("function")
        name = function.get("name") if value.get("type") == "function" and isinstance(function, dict) else None
        if not isinstance(name, str):
            raise APIError(400, 'tool_choice: use "auto", "none", "required" or {"type": "function", "function": '
                                '{"name": ...}}', param="tool_choice")
    elif value not in ("auto", "none", "required"):
        raise APIError(400, f'tool_choice {value!r}: use "auto", "none", "required" or {{"type": "function", '
                            '"function": {"name": ...}}', param="tool_choice")
    if name in ("auto", "none"):
        return name
    names = [t["function"]["name"] for t in tools]
    if not names:
        raise APIError(400, f"tool_choice {name!r} needs tools: send the functions in tools", param="tool_choice")
    if isinstance(value, dict) and name not in names:
        raise APIError(400, f"tool_choice names function {name!r}, which is not in tools ({', '.join(names)})",
                       param="tool_choice")
    return name


def _response_schema(value) -> dict | None:
    """The JSON schema ``response_format`` asks for (``{"type": "object"}`` for ``json_object``), or None."""
    kind = (value or {}).get("type", "text")
    if value is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = value.get("json_schema")
    if kind != "json_schema" or not isinstance(spec, dict):
        raise APIError(400, 'response_format: use {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                            '"json_schema": {"name": ..., "schema": {...}}}', param="response_format")
    schema = spec.get("schema", {})
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise APIError(400, "response_format.json_schema.schema must be a JSON schema object", param="response_format")
    if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
        raise APIError(400, f"response_format: the schema is longer than {MAX_SCHEMA_CHARS} characters of JSON",
                       param="response_format")
    problem = _schema_problem(schema)
    if problem:
        raise APIError(400, f"response_format.json_schema.schema is not a valid JSON schema: {problem}", param="response_format")
    return schema


def _schema_problem(schema: dict) -> str | None:
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        return exc.message
    return None


def _checked(grammar: Grammar, tokenizer, param: str) -> Grammar:
    problem = grammar_problem(grammar, tokenizer, end_of_turn_ids(tokenizer))
    if problem:
        raise APIError(400, f"{param}: the schema cannot be enforced by constrained decoding: {problem}", param=param)
    return grammar
