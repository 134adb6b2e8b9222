"""Read tool calls back out of a model's text: the inverse of :func:`tunelab.data.tool_render.format_call`, used by
the ``tool_call`` metric and reward (and meant for the server).

Families understood:

* **Hermes / Qwen 2.5 / Qwen 3 and tunelab's fallback**: one ``<tool_call>`` block per call, holding a JSON
  object ``{"name": ..., "arguments": {...}}``, after any text::

      Let me look that up.
      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

  A last block left unclosed (generation stopped at the end of the turn) is read to the end of the text.
* **Llama 3.1 / 3.2 JSON calls**: the whole answer is one bare JSON object ``{"name": ..., "parameters":
  {...}}`` (or ``"arguments"``), optionally after ``<|python_tag|>`` or inside a Markdown code fence, or a
  JSON list of such objects (parallel calls). A JSON object elsewhere in prose is text, not a call.

Not understood (read as plain text): Mistral's ``[TOOL_CALLS]``, Llama's ``<function=...>`` and built-in
``python_tag`` code, Gemma's and other pythonic call syntaxes.

Arguments are returned as objects (a JSON string of an object is parsed). A block that is not JSON, not an
object, or without a function name is reported in ``problems`` and left out of ``calls``: never an exception.
Ours, because the format is the convention of :mod:`tunelab.data.tools` and no library parses it for us.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

from tunelab.data.readers import JsonValueError, describe_type, parse_json
from tunelab.data.tools import CALL_CLOSE, CALL_OPEN, check_call

_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|\Z)", re.DOTALL)
_FENCE = re.compile(r"^```[ \t]*(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```$", re.DOTALL | re.IGNORECASE)
_PYTHON_TAG = "<|python_tag|>"


class ParsedOutput(NamedTuple):
    """A model's answer split into its text and its calls.

    Attributes:
        text: The answer without its call blocks (stripped); the whole answer when it holds no call.
        calls: ``{"name": str, "arguments": dict}`` per call, in order.
        problems: One message per block that could not be read as a call (it is not in ``calls``).
    """

    text: str
    calls: list[dict]
    problems: list[str]


def parse_tool_calls(text: str) -> ParsedOutput:
    """Split ``text`` into its prose and its tool calls (the families of the module docstring).

    Args:
        text: What the model generated for one assistant turn.

    Returns:
        The text, the calls and the problems of the blocks that are not calls.
    """
    if CALL_OPEN in text:
        calls, problems = [], []
        for k, match in enumerate(_BLOCK.finditer(text), start=1):
            call, problem = _call(match.group(1), f"tool call block {k}")
            if call is not None:
                calls.append(call)
            else:
                problems.append(problem)
        return ParsedOutput(_BLOCK.sub("", text).strip(), calls, problems)
    return _bare_json(text)


def _bare_json(text: str) -> ParsedOutput:
    """A whole answer that is a JSON call object or a list of them (Llama 3 style); else plain text."""
    body = _unfence(text.strip().removeprefix(_PYTHON_TAG))
    if not body.startswith(("{", "[")):
        return ParsedOutput(text.strip(), [], [])
    try:
        value = parse_json(body)
    except (json.JSONDecodeError, JsonValueError):
        return ParsedOutput(text.strip(), [], [])
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, dict) and "name" in v and ("arguments" in v or "parameters" in v)
                            for v in items):
        return ParsedOutput(text.strip(), [], [])  # JSON, but not calls: an answer (e.g. structured output)
    calls, problems = [], []
    for k, item in enumerate(items, start=1):
        call, problem = _object_call(item, f"tool call {k}")
        if call is not None:
            calls.append(call)
        else:
            problems.append(problem)
    return ParsedOutput("", calls, problems)


def _unfence(text: str) -> str:
    match = _FENCE.match(text)
    return match.group(1).strip() if match else text


def _call(body: str, where: str) -> tuple[dict | None, str]:
    """The call a ``<tool_call>`` block holds, or None and why not."""
    body = _unfence(body.strip())
    if not body:
        return None, f"{where} is empty"
    try:
        value = parse_json(body)
    except (json.JSONDecodeError, JsonValueError) as e:
        return None, f"{where} is not valid JSON ({e}): {body[:80]!r}"
    return _object_call(value, where)


def _object_call(value: Any, where: str) -> tuple[dict | None, str]:
    """``{"name", "arguments" or "parameters"}`` as ``{"name", "arguments": dict}``, or None and why not."""
    if not isinstance(value, dict):
        return None, f"{where} is {describe_type(value)}, not an object {{\"name\", \"arguments\"}}"
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        return None, f"{where} has no function name"
    arguments = value.get("arguments", value.get("parameters"))
    if isinstance(arguments, str):
        try:
            arguments = parse_json(arguments) if arguments.strip() else {}
        except (json.JSONDecodeError, JsonValueError) as e:
            return None, f"{where} ('{name}'): arguments are a string but not JSON ({e})"
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None, f"{where} ('{name}'): arguments are {describe_type(arguments)}, not an object"
    return {"name": name, "arguments": arguments}, ""


def plain_calls(calls: Any) -> list[dict]:
    """Calls given in the OpenAI form (``{"function": {"name", "arguments"}}``) or as ``{"name", "arguments"}``,
    as ``{"name", "arguments": dict}``; None means no calls.

    Raises:
        ValueError: A call that cannot be read (the message says which and why).
    """
    if calls is None:
        return []
    if isinstance(calls, str):
        calls = parse_json(calls) if calls.strip() else []
    if not isinstance(calls, list):
        raise ValueError(f"expected calls to be a list of calls, got {describe_type(calls)}")
    out = []
    for k, call in enumerate(calls, start=1):
        function = call.get("function", call) if isinstance(call, dict) else call
        parsed, problem = _object_call(function, f"expected call {k}")
        if parsed is None:
            raise ValueError(problem)
        out.append(parsed)
    return out


def schema_problems(calls: list[dict], tools: Any) -> list[str]:
    """Why ``calls`` break the record's ``tools``: an unknown function, or arguments against its schema."""
    functions = {t.get("function", t)["name"]: t.get("function", t) for t in tools or ()
                 if isinstance(t, dict) and isinstance(t.get("function", t), dict) and "name" in t.get("function", t)}
    problems = []
    for k, call in enumerate(calls, start=1):
        problems += check_call(f"call {k}", call, functions)
    return problems
