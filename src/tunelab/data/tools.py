"""Tool calling in the OpenAI format: validate ``tools``, assistant ``tool_calls`` and ``tool`` messages, and
render them with the model's own chat template or with tunelab's documented fallback.

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
from typing import Any, NamedTuple

from tunelab.data.readers import JsonValueError, describe_type, parse_json

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


# --- rendering ---------------------------------------------------------------------------------------


class ChatView(NamedTuple):
    """What the chat template is given for one conversation.

    Attributes:
        messages: The messages to render (rewritten into plain turns for the fallback).
        labels: Per message, the role it stands for: ``system``, ``user``, ``assistant``, ``tool`` (tool
            results) or ``tools`` (a system turn listing only the tools).
        tools: The ``tools=`` argument of ``apply_chat_template``, or None.
    """

    messages: list[dict]
    labels: list[str]
    tools: list[dict] | None


def uses_tools(messages, tools) -> bool:
    """Whether a conversation has tools, tool calls or tool results (else it renders as plain chat)."""
    return bool(tools) or any(m.get("tool_calls") or m["role"] == TOOL_ROLE for m in messages)


def chat_view(messages, tools, tokenizer) -> ChatView:
    """The messages, role labels and tools to hand ``tokenizer``'s chat template (see the module docstring)."""
    messages = [dict(m) for m in messages]
    if not uses_tools(messages, tools):
        return ChatView(messages, [m["role"] for m in messages], None)
    if renders_tools(tokenizer):
        return ChatView(messages, [m["role"] for m in messages], list(tools) if tools else None)
    plain, labels = fallback_messages(messages, tools)
    return ChatView(plain, labels, None)


def render_chat(tokenizer, messages, tools=None, *, add_generation_prompt: bool = False) -> str:
    """The text of a conversation, tool calls included, as training renders it (evaluation and serving too)."""
    view = chat_view(messages, tools, tokenizer)
    extra = {"tools": view.tools} if view.tools else {}
    return tokenizer.apply_chat_template(view.messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)


def fallback_messages(messages: list[dict], tools) -> tuple[list[dict], list[str]]:
    """The conversation as plain system/user/assistant turns in the fallback format, with each turn's label."""
    out: list[dict] = []
    labels: list[str] = []
    order: dict[str, int] = {}  # call id -> its position among the last assistant message's calls
    for n, message in enumerate(messages):
        role = message["role"]
        if role == TOOL_ROLE:
            if labels and labels[-1] == TOOL_ROLE:
                continue  # already rendered with the first result of its run
            run = _tool_run(messages, n)
            # Ids are not rendered, so results appear in the order the calls were made.
            run.sort(key=lambda m: order.get(m.get("tool_call_id"), len(order)))
            blocks = [f"{RESPONSE_OPEN}\n{m['content']}\n{RESPONSE_CLOSE}" for m in run]
            out.append({"role": "user", "content": "\n".join(blocks)})
            labels.append(TOOL_ROLE)
            continue
        content = message.get("content") or ""
        if message.get("tool_calls"):
            order = {c["id"]: k for k, c in enumerate(message["tool_calls"]) if c.get("id") is not None}
            content = "\n".join([*([content.strip()] if content.strip() else []), *map(format_call, message["tool_calls"])])
        out.append({"role": role, "content": content})
        labels.append(role)
    if tools:
        listing = tools_block(tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{listing}"
        else:
            out.insert(0, {"role": "system", "content": listing})
            labels.insert(0, TOOLS_LABEL)
    return out, labels


def _tool_run(messages: list[dict], first: int) -> list[dict]:
    """The consecutive tool messages starting at ``first``."""
    run = []
    for message in messages[first:]:
        if message["role"] != TOOL_ROLE:
            break
        run.append(message)
    return run


def tools_block(tools) -> str:
    """The fallback's listing of the tools for the system turn."""
    return TOOLS_HEADER + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + TOOLS_FOOTER


def format_call(call: dict) -> str:
    """One call in the fallback format: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``."""
    function = call["function"]
    body = json.dumps({"name": function["name"], "arguments": function["arguments"]}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


_PROBE_NAME, _PROBE_ARG, _PROBE_RESULT = "tunelab_probe_fn", "tunelab-probe-arg", "tunelab-probe-result"
_PROBE_TOOL = {"type": "function", "function": {"name": _PROBE_NAME, "description": "probe",
                                                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
_native: dict[tuple, bool] = {}


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders tools itself: passing ``tools=`` changes its output and
    it shows an assistant's call (name and arguments) and a tool result. Decided once per template."""
    key = (repr(tokenizer.chat_template), tokenizer.bos_token, tokenizer.eos_token)
    if key not in _native:
        _native[key] = _probe(tokenizer)
    return _native[key]


def _probe(tokenizer) -> bool:
    user = [{"role": "user", "content": "hi"}]
    call = {"id": "call_0", "type": "function", "function": {"name": _PROBE_NAME, "arguments": {"q": _PROBE_ARG}}}
    rounds = [*user, {"role": "assistant", "content": "", "tool_calls": [call]},
              {"role": TOOL_ROLE, "tool_call_id": "call_0", "name": _PROBE_NAME, "content": _PROBE_RESULT}]
    try:
        plain = tokenizer.apply_chat_template(user, tokenize=False)
        listed = tokenizer.apply_chat_template(user, tools=[_PROBE_TOOL], tokenize=False)
        called = tokenizer.apply_chat_template(rounds, tools=[_PROBE_TOOL], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot take tools or tool roles: the fallback renders them
        return False
    return (plain != listed and _PROBE_NAME in listed and called.count(_PROBE_NAME) > listed.count(_PROBE_NAME)
            and _PROBE_ARG in called and _PROBE_RESULT in called)
