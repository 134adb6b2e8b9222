"""Rendering conversations with tools: the model's own chat template when it renders tools, else tunelab's
documented fallback (the format is described in :mod:`tunelab.data.tools`). Training, evaluation and, later,
serving render through :func:`render_chat` / :func:`chat_view` so they agree token for token.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from tunelab.data.reasoning import reasoning_view
from tunelab.data.tools import CALL_CLOSE, CALL_OPEN, RESPONSE_CLOSE, RESPONSE_OPEN, TOOLS_FOOTER, TOOLS_HEADER, TOOLS_LABEL, TOOL_ROLE


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
    """The messages, role labels and tools to hand ``tokenizer``'s chat template (see the module docstring); an
    answer's reasoning as the template takes it (:func:`tunelab.data.reasoning.reasoning_view`)."""
    messages = reasoning_view([dict(m) for m in messages], tokenizer)
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
