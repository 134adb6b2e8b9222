"""Turn instruction data files into validated chat examples.

Four record formats are understood, each becoming a list of ``{"role", "content"}`` messages:

* ``messages``: ``{"messages": [{"role": "user", "content": ...}, ...]}``, multi-turn, optional system.
* ``prompt_completion``: ``{"prompt": ..., "completion": ..., "system": optional}``.
* ``alpaca``: ``{"instruction": ..., "input": optional, "output": ..., "system": optional}``.
* ``raw``: any record, mapped by user Jinja templates ``{"prompt", "response", "system"}``.

``messages`` also carries tool calling in the OpenAI format (``tools``, assistant ``tool_calls``, ``tool``
messages; see :mod:`tunelab.data.tools`), an assistant message may carry its reasoning (``reasoning_content``;
see :mod:`tunelab.data.reasoning`), and a message's content may be a list of text parts
(``[{"type": "text", "text": ...}]``, joined as the server joins them) or of text and image parts, kept as
a list and checked with Pillow (:mod:`tunelab.data.images`).

Loading never stops at the first bad record: every file is read in full and every problem is collected,
so the user fixes their data in one pass instead of one error per run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from tunelab.data.images import has_images, message_content, normalise_images
from tunelab.data.readers import JsonValueError, describe_type, parse_json, read_file
from tunelab.data.sandbox import BoundedSandbox, TemplateLimitError
from tunelab.data.reasoning import REASONING_KEY
from tunelab.data.tools import TOOL_ROLE, check_rounds, parse_calls, parse_tools, sidecar_path, sidecar_tools
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.safeyaml import UnreadableFileError, open_regular, read_bytes

ROLES = ("system", "user", "assistant")
MESSAGE_ROLES = (*ROLES, TOOL_ROLE)  # the messages format also takes tool results
FORMATS = ("auto", "messages", "prompt_completion", "alpaca", "raw")
_EMPTY_ANSWER = "there is nothing to train on; write the answer or remove the record"


@dataclass(frozen=True)
class Example:
    """One conversation to train on.

    Attributes:
        messages: ``{"role": ..., "content": ...}`` dicts; roles are system, user, assistant or tool, and
            the last message is always from the assistant. An assistant message may have ``tool_calls``
            (arguments as objects); a tool message has ``name`` and, when its call had one, ``tool_call_id``.
        source: Where it came from, ``"path:line"`` or ``"path:record N"``, for error messages.
        tools: The OpenAI tool definitions the conversation may call, or None.
    """

    messages: tuple[dict[str, Any], ...]
    source: str
    tools: tuple[dict[str, Any], ...] | None = None


def load_examples(
    paths: list[str],
    *,
    format: str = "auto",
    template: dict | None = None,
    system_prompt: str | None = None,
) -> list[Example]:
    """Read and validate every record of the given files.

    Args:
        paths: ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` files or ``datasets.save_to_disk`` folders.
        format: ``auto`` (detected per file from its first record), ``messages``, ``prompt_completion``,
            ``alpaca`` or ``raw``.
        template: For ``raw``: ``{"prompt": jinja, "response": jinja, "system": jinja or None}``
            rendered with the record's fields as variables.
        system_prompt: Prepended as a system message to examples that have none.

    Returns:
        The examples, in file order.

    Raises:
        DataError: Listing every bad record (``"path:line: reason"``) of every file.
        TunelabError: If ``format`` or ``template`` themselves are invalid.
    """
    if format not in FORMATS:
        raise TunelabError(f"unknown data.format {format!r}; choose one of: {', '.join(FORMATS)}")
    if format == "raw" and template is None:
        raise TunelabError("data.format is 'raw' but no data.template was given; add data.template.prompt/response")
    compiled = _compile_template(template) if template is not None else None
    if not paths:
        raise DataError(["no data files given; set data.train"], what="data")
    examples: list[Example] = []
    problems: list[str] = []
    for path in paths:
        found, file_problems = _load_file(path, format, compiled, system_prompt)
        examples.extend(found)
        problems.extend(file_problems)
    if problems:
        raise DataError(problems, what=", ".join(paths))
    return examples


def _load_file(
    path: str, format: str, compiled: dict | None, system_prompt: str | None
) -> tuple[list[Example], list[str]]:
    """One file's examples and its problems, in line order."""
    raw = read_file(path)
    problems: list[tuple[int, str]] = list(raw.problems)
    if not raw.records and not raw.problems:
        problems.append((0, f"{path}: no records (the file is empty); add examples or remove it from the config"))
    fmt = format if format != "auto" else _detect(raw.records, compiled is not None, problems)
    shared, sidecar_problems = sidecar_tools(path)
    problems.extend((0, p) for p in sidecar_problems)
    examples = []
    for position, where, record in raw.records:
        if not isinstance(record, dict):
            kind = describe_type(record)
            problems.append((position, f"{where}: record is {kind}, not an object with named fields"))
            continue
        if fmt is None:
            continue  # detection failed; already reported once for the file
        messages, errors = _convert(record, fmt, compiled)
        tools = shared
        if "tools" in record and fmt != "raw":  # a raw record's fields are the template's, not OpenAI tools
            tools, tool_errors = parse_tools(record["tools"])
            errors = errors + tool_errors
        if not errors:
            messages, errors = check_rounds(messages, tools)
        if not errors and has_images(messages):
            messages, errors = normalise_images(messages, Path(path).parent)
        problems.extend((position, f"{where}: {e}") for e in errors)
        if not errors:
            examples.append(Example(tuple(_with_system(messages, system_prompt)), where, tools))
    # Readers report unparseable lines before records are validated; users expect file order.
    problems.sort(key=lambda p: p[0])
    return examples, [message for _, message in problems]


def _detect(records: list[tuple[int, str, Any]], has_template: bool, problems: list[tuple[int, str]]) -> str | None:
    """Pick a format from the first record that is an object; report and return None if none fits."""
    first = next(((pos, where, r) for pos, where, r in records if isinstance(r, dict)), None)
    if first is None:
        return None
    position, where, record = first
    keys = set(record)
    if has_template:  # the user asked for their fields to be mapped; honour that over key sniffing
        return "raw"
    if "messages" in keys:
        return "messages"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    message = (
        f"{where}: cannot tell the data format: the first record has keys {sorted(keys)}, but expected "
        "'messages', or 'prompt' + 'completion', or 'instruction' + 'output'. Set data.format "
        "(messages, prompt_completion, alpaca) or give data.template (prompt/response Jinja templates) "
        "to map your fields"
    )
    problems.append((position, message))
    return None


def _convert(record: dict, fmt: str, compiled: dict | None) -> tuple[list[dict[str, str]], list[str]]:
    """One record to messages, or the reasons it cannot be converted."""
    if fmt == "messages":
        return _from_messages(record)
    if fmt == "prompt_completion":
        return _from_fields(record, "prompt", "completion")
    if fmt == "alpaca":
        return _from_fields(record, "instruction", "output", extra="input")
    assert compiled is not None  # load_examples refuses raw without a template
    return _from_template(record, compiled)


def _field(record: dict, name: str, errors: list[str], *, required: bool = True, answer: bool = False) -> str | None:
    """A string field; appends a problem if it is missing (when required), not a string, or an empty answer."""
    value = record.get(name)
    if value is None:
        if required:
            state = "is null" if name in record else "is missing"
            errors.append(f"field '{name}' {state} (record has fields: {', '.join(sorted(map(str, record)))})")
        return None
    if not isinstance(value, str):
        errors.append(f"field '{name}' must be a string, got {describe_type(value)}")
        return None
    if answer and not value.strip():
        errors.append(f"field '{name}' is empty; {_EMPTY_ANSWER}")
        return None
    return value


def _from_fields(record: dict, prompt: str, answer: str, extra: str | None = None) -> tuple[list, list[str]]:
    """``prompt_completion`` and ``alpaca``: a user turn, an assistant turn, an optional system turn."""
    errors: list[str] = []
    user = _field(record, prompt, errors)
    reply = _field(record, answer, errors, answer=True)
    system = _field(record, "system", errors, required=False)
    addition = _field(record, extra, errors, required=False) if extra else None
    if errors:
        return [], errors
    if addition and addition.strip():
        user = f"{user}\n\n{addition}"
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages, []


def _from_messages(record: dict) -> tuple[list[dict[str, str]], list[str]]:
    """The ``messages`` format: every message checked, then the conversation's shape."""
    value = record.get("messages")
    if isinstance(value, str):
        # CSV cells and some parquet exports hold the list as a JSON string.
        try:
            value = parse_json(value)
        except json.JSONDecodeError as e:
            return [], [f"field 'messages' is a string but not valid JSON: {e}"]
        except JsonValueError as e:
            return [], [f"field 'messages': {e}"]
    if value is None:
        return [], ["field 'messages' is missing or null"]
    if not isinstance(value, list):
        return [], [f"field 'messages' must be a list of {{role, content}} objects, got {describe_type(value)}"]
    if not value:
        return [], ["field 'messages' is empty; add at least a user and an assistant message"]
    messages: list[dict[str, str]] = []
    errors: list[str] = []
    for n, message in enumerate(value, start=1):
        checked = _check_message(n, message, errors)
        if checked is not None:
            messages.append(checked)
    if errors:
        return [], errors
    return messages, _check_conversation(messages)


def _check_message(n: int, message: Any, errors: list[str]) -> dict[str, Any] | None:
    """Validate message number ``n`` (1-based); append problems and return None if it is bad."""
    if not isinstance(message, dict):
        errors.append(f"message {n} is {describe_type(message)}, not an object with 'role' and 'content'")
        return None
    role, calls = message.get("role"), message.get("tool_calls") or None
    before = len(errors)
    if role is None:
        errors.append(f"message {n} has no 'role'; every message needs 'role' and 'content'")
    elif role not in MESSAGE_ROLES:
        errors.append(f"message {n} has unknown role {role!r}; allowed roles: {', '.join(MESSAGE_ROLES)}")
    content = message_content(n, message.get("content"), errors)
    calling = role == "assistant" and calls is not None
    if calls is not None and role != "assistant":
        errors.append(f"message {n} has tool_calls but its role is {role!r}; only assistant messages call tools")
    elif calls is not None:
        calls = parse_calls(n, calls, errors)
    if message.get("content") is None and not calling:
        errors.append(f"message {n} has no 'content'; every message needs 'role' and 'content'")
    elif role == "assistant" and not calling and isinstance(content, str) and not content.strip():
        errors.append(f"message {n} (assistant) is empty; {_EMPTY_ANSWER}")
    reasoning = message.get(REASONING_KEY)
    if reasoning is not None and (role != "assistant" or not isinstance(reasoning, str)):
        errors.append(f"message {n}: {REASONING_KEY} is an assistant's reasoning, a string"
                      f" (this is {role!r} with {describe_type(reasoning)})")
    call_id = message.get("tool_call_id")
    if role == TOOL_ROLE and call_id is not None and not isinstance(call_id, str):
        errors.append(f"message {n} (tool): tool_call_id must be a string, got {describe_type(call_id)}")
    if len(errors) > before:
        return None
    checked: dict[str, Any] = {"role": role, "content": content or ""}
    if calls:
        checked["tool_calls"] = calls
    if reasoning and reasoning.strip():
        checked[REASONING_KEY] = reasoning
    if role == TOOL_ROLE and call_id is not None:
        checked["tool_call_id"] = call_id
    return checked


def _check_conversation(messages: list[dict[str, str]]) -> list[str]:
    """Problems with the order of turns in an otherwise valid conversation."""
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        return ["conversation has no assistant message; add the answer the model should learn"]
    errors = []
    if roles[-1] != "assistant":
        errors.append(
            f"the last message is from {roles[-1]!r}, not the assistant; end the conversation with the "
            "assistant's answer (nothing after it would be trained)"
        )
    if "system" in roles[1:]:
        errors.append("a system message must come first; move it to the start or merge it into the first one")
    return errors


def _compile_template(template: dict) -> dict[str, jinja2.Template | None]:
    """Compile the raw-format templates once; undefined variables are errors, not empty strings."""
    if not isinstance(template, dict):
        raise TunelabError("data.template must be a mapping with 'prompt', 'response' and optional 'system'")
    env = BoundedSandbox(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    compiled: dict[str, jinja2.Template | None] = {}
    problems = []
    for key in ("prompt", "response", "system"):
        source = template.get(key)
        if source is None and key != "system":
            problems.append(f"data.template.{key} is missing")
            continue
        try:
            compiled[key] = env.from_string(source) if source is not None else None
        except jinja2.TemplateSyntaxError as e:
            problems.append(f"data.template.{key}: invalid Jinja on line {e.lineno}: {e.message}")
    if problems:
        raise ConfigError(problems, source="data.template")
    return compiled


def _from_template(record: dict, compiled: dict) -> tuple[list[dict[str, str]], list[str]]:
    """The ``raw`` format: render the templates with the record's fields as variables."""
    rendered: dict[str, str] = {}
    errors: list[str] = []
    for key, tmpl in compiled.items():
        if tmpl is None:
            continue
        try:
            rendered[key] = tmpl.environment.render(tmpl, {str(k): v for k, v in record.items()})
        except TemplateLimitError as e:
            errors.append(f"data.template.{key}: {e}")
        except jinja2.UndefinedError as e:
            errors.append(
                f"data.template.{key} uses a field this record lacks ({e.message}); "
                f"record has fields: {', '.join(sorted(map(str, record)))}"
            )
        except Exception as e:  # a template bug (e.g. a filter on the wrong type) is still per-record
            errors.append(f"data.template.{key} failed on this record: {type(e).__name__}: {e}")
    if not errors and not rendered["response"].strip():
        errors.append(f"data.template.response rendered an empty answer; {_EMPTY_ANSWER}")
    if errors:
        return [], errors
    system = rendered.get("system")
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    messages += [
        {"role": "user", "content": rendered["prompt"]},
        {"role": "assistant", "content": rendered["response"]},
    ]
    return messages, []


def _with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Prepend the default system prompt unless the example brings its own."""
    if system_prompt and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def data_fingerprint(paths: list[str]) -> str:
    """A sha256 over the data files' bytes, to refuse resuming a run whose data changed.

    Args:
        paths: Files or saved-dataset folders; a folder contributes every file inside it, sorted by
            relative path, with the relative names included so renames inside it count as changes.

    Returns:
        The hex digest.

    Raises:
        DataError: If a path does not exist.
    """
    missing = [f"{p}: file not found" for p in paths if not Path(p).exists()]
    if missing:
        raise DataError(missing, what=", ".join(paths))
    digest = hashlib.sha256()
    for path in paths:
        p = Path(path)
        if p.is_dir():
            files = sorted((f for f in p.rglob("*") if f.is_file()), key=lambda f: f.relative_to(p).as_posix())
        else:
            files = [p]
        digest.update(b"D" if p.is_dir() else b"F")
        for f in files:
            if p.is_dir():
                name = f.relative_to(p).as_posix().encode()
                digest.update(len(name).to_bytes(8, "big") + name)
            # Length prefixes keep (a, bc) and (ab, c) from hashing alike.
            digest.update(f.stat().st_size.to_bytes(8, "big"))
            try:
                stream = open_regular(f)  # a link to /dev/zero or a FIFO would be read forever
            except UnreadableFileError as e:
                raise DataError([str(e)], what=", ".join(paths)) from None
            with stream:
                # Chunks, because training files can be larger than memory allows reading at once.
                while chunk := stream.read(1 << 20):
                    digest.update(chunk)
        sidecar = sidecar_path(p)
        if sidecar.is_file():  # the tools of the records without their own are part of the data
            try:
                digest.update(b"T" + read_bytes(sidecar, 1 << 20))
            except UnreadableFileError as e:
                raise DataError([str(e)], what=", ".join(paths)) from None
    return digest.hexdigest()
