"""Prompt data for on-policy training (GRPO): a conversation to answer plus the fields its rewards read.

Two record shapes, read by :mod:`tunelab.data.readers` (every bad record of every file at once, as
``file:line: reason``):

* ``{"prompt": "...", "system": optional, **fields}``;
* ``{"messages": [...], **fields}`` — the context ends with a user turn; instruction data whose
  conversation ends with the assistant's answer is accepted too, and that answer becomes the field
  ``answer`` (so an SFT training file is GRPO data whose reference answers reach ``sql_exec``).

Every other key of the record (a gold answer, a database path, a JSON schema) is a field: the reward
functions receive it, one value per completion. ``tools`` (the record's own, else those of the file's
``NAME.tools.json`` sidecar, checked as for SFT data) is a field too, and the prompt is sampled with them
rendered as training renders them (:func:`tunelab.data.tool_render.render_chat`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunelab.data.readers import describe_type, read_file
from tunelab.data.records import ROLES
from tunelab.data.tools import parse_tools, sidecar_tools
from tunelab.errors import DataError

_SHAPE = 'a {"prompt": ...} or {"messages": [...]} object'


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: ``messages`` end with a user turn; ``fields`` go to the reward functions."""

    messages: tuple[dict[str, str], ...]
    fields: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def load_prompts(paths: list[str], *, system_prompt: str | None = None) -> list[PromptRecord]:
    """Read and validate every prompt record of ``paths``; DataError lists every bad one."""
    if not paths:
        raise DataError(["no prompt files given; set data.train"], what="data")
    records: list[PromptRecord] = []
    problems: list[tuple[str, int, str]] = []
    for path in paths:
        raw = read_file(path)
        shared, sidecar_problems = sidecar_tools(path)
        problems += [(path, position, message) for position, message in raw.problems] + [(path, 0, m) for m in sidecar_problems]
        if not raw.records and not raw.problems:
            problems.append((path, 0, f"{path}: no records (the file is empty); add prompts or remove it from the config"))
        for position, where, record in raw.records:
            parsed, errors = _parse(record, where, system_prompt, shared)
            problems += [(path, position, f"{where}: {e}") for e in errors]
            if parsed is not None:
                records.append(parsed)
    if problems:
        raise DataError([message for *_, message in sorted(problems, key=lambda p: (paths.index(p[0]), p[1]))],
                        what=", ".join(paths))
    return records


def _parse(record: Any, where: str, system_prompt: str | None, shared_tools) -> tuple[PromptRecord | None, list[str]]:
    if not isinstance(record, dict):
        return None, [f"expected {_SHAPE}, got {describe_type(record)}"]
    fields = {k: v for k, v in record.items() if k not in ("prompt", "messages", "system", "tools")}
    tools, tool_errors = parse_tools(record["tools"]) if "tools" in record else (shared_tools, [])
    if tools:
        fields["tools"] = list(tools)  # sampling renders the prompt with them (the reward functions get them too)
    if "messages" in record:
        messages, errors = _messages(record["messages"])
        if messages and messages[-1]["role"] == "assistant":
            fields.setdefault("answer", messages.pop()["content"])
        if not errors and (not messages or messages[-1]["role"] != "user"):
            errors.append("the conversation must end with a user turn (the answer is what the model samples)")
    elif isinstance(record.get("prompt"), str) and record["prompt"].strip():
        messages = [{"role": "user", "content": record["prompt"]}]
        if isinstance(record.get("system"), str) and record["system"].strip():
            messages.insert(0, {"role": "system", "content": record["system"]})
        errors = []
    else:
        return None, ["needs a non-empty 'prompt' string or a 'messages' list"]
    if errors or tool_errors:
        return None, errors + tool_errors
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return PromptRecord(tuple(messages), fields, where), []


def _messages(value: Any) -> tuple[list[dict[str, str]], list[str]]:
    if not isinstance(value, list) or not value:
        return [], [f"'messages' must be a non-empty list of messages, got {describe_type(value)}"]
    messages, errors = [], []
    for n, message in enumerate(value, start=1):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES:
            errors.append(f"message {n} needs a 'role' among {', '.join(ROLES)}, got {role!r}")
        elif not isinstance(content, str):
            errors.append(f"message {n} 'content' must be a string, got {describe_type(content)}")
        else:
            messages.append({"role": role, "content": content})
    return messages, errors
