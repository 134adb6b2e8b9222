"""Tool calling in the OpenAI format: validate ``tools``, assistant ``tool_calls`` and ``tool`` messages; the
format of tunelab's fallback rendering (done in :mod:`tunelab.data.tool_render`).

Records (the ``messages`` format; ``tools`` also on ``prompt_completion`` and ``alpaca`` records)::

    {"tools": [{"type": "function", "function": {"name": "get_weather", "description": "...",
                "parameters": {JSON schema of the arguments}}}],
     "messages": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "c2", "content": "21 C"},
        {"role": "assistant", "content": "Paris 18 C, Rome 21 C."}]}

A file's records without ``tools`` of their own take those of its sidecar ``NAME.tools.json`` beside the
file ``NAME.jsonl`` (a JSON list of the same tool objects). Arguments are kept as an object (given as a JSON
string or an object); a tool message without ``tool_call_id`` answers the oldest unanswered call.

Rendering. A chat template that renders tools (``apply_chat_template(..., tools=...)`` changes the output
and an assistant's ``tool_calls`` and a ``tool`` message appear in it: Qwen 2.5/3, Llama 3.1, Hermes, ...)
gets the messages as they are. Any other template (SmolLM2's, ChatML without tools, Gemma's) gets them
rewritten into plain system/user/assistant turns, the **fallback** (the Hermes/Qwen convention), which
evaluation, export and serving read back the same way:

* The tools are listed in the system turn (appended to the record's system message after a blank line,
  or as a system message of their own)::

      # Tools

      You may call one or more functions to assist with the user query.

      You are provided with function signatures within <tools></tools> XML tags:
      <tools>
      {"type": "function", "function": {"name": "get_weather", ...}}      (one JSON object a line)
      </tools>

      For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
      <tool_call>
      {"name": <function-name>, "arguments": <args-json-object>}
      </tool_call>

* An assistant message with calls is its text (if any), then one block per call, separated by newlines::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

* Consecutive ``tool`` messages become one user turn, one block each in the order of the calls they
  answer (ids are not rendered: the n-th result answers the n-th call)::

      <tool_response>
      18 C
      </tool_response>

Only the assistant's turns (its calls and answers) are trained; the tools listing and the tool results are
not (``data.loss_on: all`` trains every token).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from tunelab.data.readers import JsonValueError, describe_type, parse_json
from tunelab.safeyaml import UnreadableFileError, read_text

TOOL_ROLE = "tool"
TOOLS_LABEL = "tools"  # the role label of a system turn that only lists the tools
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
_ROLES_ANSWERED_BY = "add a message with role 'tool' and its tool_call_id for each call"


# --- validation ------------------------------------------------------------------------------------


def parse_tools(value: Any, origin: str = "field 'tools'") -> tuple[tuple[dict, ...] | None, list[str]]:
    """Check a list of tool definitions and normalise each to ``{"type": "function", "function": {...}}``.

    Args:
        value: The record's ``tools`` (a list, or a JSON string of one as CSV cells hold it) or a sidecar's.
        origin: How problems name the value.

    Returns:
        ``(tools or None when the list is empty, problems)``.
    """
    if isinstance(value, str):
        try:
            value = parse_json(value)
        except (json.JSONDecodeError, JsonValueError) as e:
            return None, [f"{origin} is a string but not valid JSON: {e}"]
    if value is None:
        return None, []
    if not isinstance(value, list):
        return None, [f"{origin} must be a list of {{type: function, function: {{name, parameters}}}}, got {describe_type(value)}"]
    tools, errors, names = [], [], set()
    for n, tool in enumerate(value, start=1):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or (isinstance(tool, dict) and tool.get("type", "function") != "function"):
            errors.append(f"{origin}: tool {n} must be {{\"type\": \"function\", \"function\": {{\"name\", \"parameters\"}}}}")
            continue
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            errors.append(f"{origin}: tool {n} has no function name; set function.name")
            continue
        if name in names:
            errors.append(f"{origin}: tool {n} defines function '{name}' a second time; give each function once")
        names.add(name)
        schema_error = _schema_problem(function.get("parameters", {}))
        if schema_error:
            errors.append(f"{origin}: tool {n} ('{name}'): parameters is not a valid JSON schema: {schema_error}")
        tools.append({"type": "function", "function": function})
    return (tuple(tools) or None), errors


def parse_calls(n: int, value: Any, errors: list[str]) -> list[dict] | None:
    """Check message ``n``'s ``tool_calls`` and normalise them (arguments parsed to an object).

    Each call is ``{"id", "type": "function", "function": {"name", "arguments"}}`` (``{"name", "arguments"}``
    is accepted too); problems are appended to ``errors``.

    Returns:
        The calls as ``{"id"?, "type", "function": {"name", "arguments": dict}}``, or None if any is bad.
    """
    if not isinstance(value, list):
        errors.append(f"message {n} 'tool_calls' must be a list of calls, got {describe_type(value)}")
        return None
    calls, before, ids = [], len(errors), set()
    for k, call in enumerate(value, start=1):
        where = f"message {n} tool call {k}"
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            errors.append(f"{where} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}")
            continue
        name, call_id = function.get("name"), call.get("id")
        if not isinstance(name, str) or not name:
            errors.append(f"{where} has no function name; set function.name")
        if call_id is not None and not isinstance(call_id, str):
            errors.append(f"{where}: id must be a string, got {describe_type(call_id)}")
        elif call_id in ids:
            errors.append(f"{where}: id '{call_id}' is used twice in this message; give each call its own id")
        ids.add(call_id)
        arguments = _arguments(where, function.get("arguments"), errors)
        normal = {"type": "function", "function": {"name": name, "arguments": arguments}}
        calls.append({"id": call_id, **normal} if call_id is not None else normal)
    return calls if len(errors) == before else None


def _arguments(where: str, value: Any, errors: list[str]) -> dict | None:
    """A call's arguments as an object: a JSON string is parsed, an object kept, nothing means ``{}``."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = parse_json(value) if value.strip() else {}
        except (json.JSONDecodeError, JsonValueError) as e:
            errors.append(f"{where}: arguments are not valid JSON ({e}); write them as a JSON object or its string")
            return None
    if not isinstance(value, dict):
        errors.append(f"{where}: arguments must be a JSON object of named arguments, got {describe_type(value)}")
        return None
    return value


def check_rounds(messages: list[dict], tools: tuple[dict, ...] | None) -> tuple[list[dict], list[str]]:
    """Check the calls against the tools and pair every tool message with the call it answers.

    Returns:
        ``(messages, problems)``: each tool message gets ``tool_call_id`` (when the call has one) and
        ``name`` from the call it answers.
    """
    functions = {t["function"]["name"]: t["function"] for t in tools or ()}
    pending: list[dict] = []  # calls not answered yet, oldest first
    answered: set[str] = set()
    caller, out, errors = 0, [], []
    for n, message in enumerate(messages, start=1):
        message = dict(message)
        if message["role"] == TOOL_ROLE:
            call = _answered_call(n, message, pending, answered, caller, errors)
            if call is not None:
                message["name"] = call["function"]["name"]
                message.setdefault("tool_call_id", call.get("id"))
                if message["tool_call_id"] is None:
                    del message["tool_call_id"]
        else:
            if pending:
                names = ", ".join(_call_name(c) for c in pending)
                errors.append(f"message {caller}: call(s) {names} get no tool message before message {n}; {_ROLES_ANSWERED_BY}")
                pending = []
            for k, call in enumerate(message.get("tool_calls") or (), start=1):
                errors += check_call(f"message {n} tool call {k}", call["function"], functions)
            if message.get("tool_calls"):
                pending, caller = list(message["tool_calls"]), n
        out.append(message)
    return out, errors


def _answered_call(n: int, message: dict, pending: list[dict], answered: set[str], caller: int,
                   errors: list[str]) -> dict | None:
    """The pending call tool message ``n`` answers (removed from ``pending``), or None after reporting why."""
    wanted = message.get("tool_call_id")
    if not pending:
        again = f" (call '{wanted}' was answered already)" if wanted in answered else ""
        errors.append(f"message {n} (tool) answers no call{again}: no assistant tool call is waiting for a result "
                      "before it; remove it, or add the assistant message with the matching tool_calls")
        return None
    if wanted is None:
        call = pending.pop(0)
    else:
        call = next((c for c in pending if c.get("id") == wanted), None)
        if call is None:
            ids = ", ".join(repr(c.get("id")) for c in pending)
            errors.append(f"message {n} (tool): tool_call_id {wanted!r} matches no unanswered call of message {caller} "
                          f"(its ids: {ids}); use the id of the call it answers")
            return None
        pending.remove(call)
    if call.get("id") is not None:
        answered.add(call["id"])
    return call


def check_call(where: str, function: dict, functions: dict[str, dict]) -> list[str]:
    """A call names a defined function and its arguments satisfy that function's parameter schema."""
    name = function["name"]
    if name not in functions:
        if not functions:
            return [f"{where} calls '{name}' but the record has no tools; add 'tools' to the record "
                    "or a NAME.tools.json sidecar beside the data file"]
        close = difflib.get_close_matches(name, list(functions), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return [f"{where} calls '{name}', which is not in tools ({', '.join(functions)}); {hint}"
                "fix the name or add the function to tools"]
    problem = _argument_problem(function["arguments"], functions[name].get("parameters") or {})
    return [f"{where}: arguments break the schema of '{name}': {problem}"] if problem else []


def _call_name(call: dict) -> str:
    call_id = call.get("id")
    return f"'{call['function']['name']}'" + (f" (id {call_id!r})" if call_id is not None else "")


def _validator(schema: Any):
    """A jsonschema validator that never fetches a remote ``$ref`` (an empty registry resolves nothing)."""
    import referencing
    from jsonschema.validators import validator_for

    cls = validator_for(schema) if isinstance(schema, dict) else validator_for({})
    return cls, cls(schema, registry=referencing.Registry())


def _schema_problem(schema: Any) -> str | None:
    """Why ``schema`` is not a JSON schema, or None."""
    from jsonschema.exceptions import SchemaError

    if not isinstance(schema, (dict, bool)):
        return f"expected an object, got {describe_type(schema)}"
    try:
        cls, _ = _validator(schema)
        cls.check_schema(schema)
    except SchemaError as e:
        return e.message
    return None


def _argument_problem(arguments: dict, schema: Any) -> str | None:
    """The most relevant way ``arguments`` break ``schema`` (with how many more there are), or None."""
    from jsonschema.exceptions import best_match

    try:
        _, validator = _validator(schema)
        found = list(validator.iter_errors(arguments))
    except Exception as e:  # noqa: BLE001 - an unresolvable $ref or a bad pattern in the user's schema
        return f"the schema cannot be checked ({type(e).__name__}: {e})"
    if not found:
        return None
    error = best_match(found)
    at = "/".join(map(str, error.absolute_path))
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return (f"at '{at}': " if at else "") + error.message + more


# --- the sidecar ------------------------------------------------------------------------------------


def sidecar_path(path: str | Path) -> Path:
    """The tools sidecar of a data file or saved dataset: ``NAME.tools.json`` beside ``NAME.jsonl`` (or ``NAME/``)."""
    p = Path(path)
    return p.parent / f"{p.name if p.is_dir() else p.stem}.tools.json"


def sidecar_tools(path: str) -> tuple[tuple[dict, ...] | None, list[str]]:
    """The tools every record of ``path`` without its own ``tools`` gets, from its sidecar if there is one."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None, []
    try:
        value = parse_json(read_text(sidecar))
    except json.JSONDecodeError as e:
        return None, [f"{sidecar}:{e.lineno}: not valid JSON ({e.msg}); write a JSON list of tools"]
    except (JsonValueError, UnreadableFileError, OSError, UnicodeDecodeError) as e:
        return None, [f"{sidecar}: cannot read the tools sidecar: {e}"]
    return parse_tools(value, origin=str(sidecar))
