"""Read the prompts a model should answer: conversations ending with a user turn, or ``prompt`` records.

Data generation needs the question without the answer, which instruction data (:mod:`tunelab.data.records`)
refuses by design (a conversation must end with the answer to train on). So the two answer-less shapes are
read here, on the same readers (every bad record reported at once as ``file:line: reason``):

* ``{"messages": [...ending with a user turn]}``; a final assistant turn, if present, is dropped (ignored).
* ``{"prompt": ..., "system": optional}``; a ``completion``/``response`` field, if present, is ignored.

Any other file (alpaca records, a raw format with a template) is read by :func:`tunelab.data.load_examples`
and its final assistant message is dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tunelab.data import ROLES, load_examples
from tunelab.data.readers import describe_type, read_file
from tunelab.errors import DataError

_QUESTION_FIELDS = frozenset({"messages", "prompt"})  # a record with either is read here, answer or not


@dataclass(frozen=True)
class Prompt:
    """One conversation to answer.

    Attributes:
        messages: ``{"role", "content"}`` messages; the last one is from the user.
        source: Where it came from, ``"path:line"`` or ``"path:record N"``.
    """

    messages: tuple[dict[str, str], ...]
    source: str


def read_prompts(path: str, *, format: str = "auto", template: dict | None = None,
                 system_prompt: str | None = None) -> list[Prompt]:
    """Read and validate every prompt of a data file.

    Args:
        path: A ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file, or a ``datasets.save_to_disk`` folder.
        format: As ``data.format``; ``alpaca`` and ``raw`` are read as instruction data (answer dropped).
        template: As ``data.template`` (raw format).
        system_prompt: Prepended as a system message to prompts that have none.

    Returns:
        The prompts, in file order.

    Raises:
        DataError: Listing every bad record (``"path:line: reason"``).
    """
    raw = read_file(path)
    first = next((r for _, _, r in raw.records if isinstance(r, dict)), None)
    # The answer-less shapes are read here; the formats whose question is not a plain field go to load_examples.
    answerless = format in ("messages", "prompt_completion") or (
        format == "auto" and template is None and first is not None and not _QUESTION_FIELDS.isdisjoint(first))
    if not answerless:  # instruction data, or nothing readable: load_examples reports its own problems
        examples = load_examples([path], format=format, template=template, system_prompt=system_prompt)
        return [Prompt(e.messages[:-1], e.source) for e in examples]
    problems: list[tuple[int, str]] = list(raw.problems)
    if not raw.records and not raw.problems:
        problems.append((0, f"{path}: no records (the file is empty); add prompts"))
    prompts = []
    text_cells = path.lower().endswith(".csv")  # CSV cells hold a messages list as JSON text
    for position, where, record in raw.records:
        messages, errors = _parse(record, text_cells)
        problems.extend((position, f"{where}: {e}") for e in errors)
        if not errors:
            prompts.append(Prompt(tuple(_with_system(messages, system_prompt)), where))
    if problems:
        raise DataError([m for _, m in sorted(problems, key=lambda p: p[0])], what=path)
    return prompts


def _parse(record: Any, text_cells: bool) -> tuple[list[dict[str, str]], list[str]]:
    """One record to the conversation to answer, or every reason it cannot be one."""
    if not isinstance(record, dict):
        return [], [f"record is {describe_type(record)}, not an object with named fields"]
    if record.get("messages") is not None:
        return _from_messages(record["messages"], text_cells)
    prompt, system = record.get("prompt"), record.get("system")
    if prompt is None:
        fields = ", ".join(sorted(map(str, record)))
        return [], [f"record has no 'messages' or 'prompt' (it has fields: {fields}); give the question as 'prompt' "
                    "(a string) or 'messages' (ending with the user turn)"]
    errors = [f"field '{name}' must be a string, got {describe_type(value)}"
              for name, value in (("prompt", prompt), ("system", system)) if value is not None and not isinstance(value, str)]
    if not errors and not prompt.strip():
        errors.append("field 'prompt' is empty; there is nothing to answer: write the question or remove the record")
    if errors:
        return [], errors
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}], []


def _from_messages(value: Any, text_cells: bool) -> tuple[list[dict[str, str]], list[str]]:
    """The context of a ``messages`` record: well-formed messages, system first, ending with a user turn."""
    if isinstance(value, str) and text_cells:
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            return [], [f"field 'messages' is text but not valid JSON: {e}"]
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else describe_type(value)
        return [], [f"field 'messages' must be a non-empty list of {{role, content}} objects, got {got}"]
    errors: list[str] = []
    for n, message in enumerate(value, start=1):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(message, dict):
            errors.append(f"message {n} is {describe_type(message)}, not an object with 'role' and 'content'")
        elif role not in ROLES:
            what = "no 'role'" if role is None else f"unknown role {role!r}"
            errors.append(f"message {n} has {what}; allowed roles: {', '.join(ROLES)}")
        elif not isinstance(content, str):
            errors.append(f"message {n} 'content' must be a string, got {describe_type(content)}")
    if errors:
        return [], errors
    messages = [{"role": m["role"], "content": m["content"]} for m in value]
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]  # an answer already there is ignored: the model writes its own
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        errors.append("a system message must come first in 'messages'; move it to the start")
    if not roles or roles[-1] != "user":
        errors.append("the conversation in 'messages' does not end with a user turn (before any final answer); "
                      "end it with the question the model should answer")
    elif not messages[-1]["content"].strip():
        errors.append("the last user message is empty; there is nothing to answer: write the question or remove the record")
    return (messages, []) if not errors else ([], errors)


def _with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Prepend the default system prompt unless the prompt brings its own."""
    if system_prompt and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages
