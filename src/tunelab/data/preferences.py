"""Preference data (a shared context, a chosen and a rejected answer): load, validate, tokenize, batch.

Two record formats are understood:

* ``{"prompt": ..., "chosen": ..., "rejected": ..., "system": optional}``.
* ``{"messages": [...context ending with a user turn], "chosen": ..., "rejected": ...}``.

``chosen`` and ``rejected`` are each a string or an assistant message ``{"role": "assistant",
"content": ...}``; an optional numeric ``margin`` says by how much chosen is preferred. Files are read by
:mod:`tunelab.data.readers`, and every bad record of every file is reported at once as ``file:line:
reason``. Each side is tokenized as the context plus that answer through
:func:`tunelab.data.tokenize_examples`, so its loss mask (answer and end-of-turn token trained, the
context masked) is exactly the one supervised fine-tuning uses.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.data.collate import collate
from tunelab.data.readers import JsonValueError, describe_type, parse_json, read_file
from tunelab.data.records import ROLES, Example
from tunelab.data.tokenize import IGNORE_INDEX, TOO_LONG, TokenizedExample, render_example, tokenize_examples
from tunelab.errors import DataError, TunelabError

SIDES = ("chosen", "rejected")
_ANSWER_SHAPE = 'a string or an assistant message {"role": "assistant", "content": ...}'


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair.

    Attributes:
        context: ``{"role", "content"}`` messages shared by both answers; the last is from the user.
        chosen: The preferred answer's text.
        rejected: The dispreferred answer's text.
        margin: How strongly ``chosen`` is preferred, if the data says so.
        source: Where it came from, ``"path:line"`` or ``"path:record N"``.
    """

    context: tuple[dict[str, str], ...]
    chosen: str
    rejected: str
    margin: float | None
    source: str

    def side(self, name: str) -> Example:
        """The conversation ``context + answer`` of side ``name`` (``"chosen"`` or ``"rejected"``)."""
        answer = {"role": "assistant", "content": getattr(self, name)}
        return Example((*self.context, answer), f"{self.source} ({name})")


@dataclass
class TokenizedPair:
    """Both sides of a pair as token ids and labels (-100 on the context), ready for :func:`collate_pairs`."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    margin: float | None
    source: str


@dataclass
class PreferenceStats:
    """What tokenizing the pairs produced, for the user to check before spending compute."""

    pairs: int = 0
    tokens: int = 0  # over both sides of every kept pair
    trained_tokens: dict[str, int] = field(default_factory=lambda: {side: 0 for side in SIDES})
    truncated: int = 0  # pairs with at least one side cut to max_length
    dropped: list[str] = field(default_factory=list)
    max_len: int = 0
    mean_len: float = 0.0  # tokens per side


def load_preferences(paths: list[str], *, system_prompt: str | None = None) -> list[PreferenceExample]:
    """Read and validate every preference record of the given files.

    Args:
        paths: ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` files or ``datasets.save_to_disk`` folders.
        system_prompt: Prepended as a system message to contexts that have none.

    Returns:
        The pairs, in file order.

    Raises:
        DataError: Listing every bad record (``"path:line: reason"``) of every file.
    """
    if not paths:
        raise DataError(["no preference data files given; set data.train"], what="data")
    examples: list[PreferenceExample] = []
    problems: list[str] = []
    for path in paths:
        raw = read_file(path)
        found: list[tuple[int, str]] = list(raw.problems)
        if not raw.records and not raw.problems:
            found.append((0, f"{path}: no records (the file is empty); add pairs or remove it from the config"))
        # CSV cells are all strings, so a margin or a messages list arrives as text there.
        text_cells = path.lower().endswith(".csv")
        for position, where, record in raw.records:
            example, errors = _parse(record, where, text_cells, system_prompt)
            found.extend((position, f"{where}: {e}") for e in errors)
            if example is not None:
                examples.append(example)
        # Readers report unparseable lines before records are validated; users expect file order.
        problems.extend(message for _, message in sorted(found, key=lambda p: p[0]))
    if problems:
        raise DataError(problems, what=", ".join(paths))
    return examples


def _parse(record: Any, where: str, text_cells: bool, system_prompt: str | None) -> tuple[PreferenceExample | None, list[str]]:
    """One record to a pair, or every reason it cannot be one."""
    if not isinstance(record, dict):
        return None, [f"record is {describe_type(record)}, not an object with named fields"]
    errors: list[str] = []
    context = _context(record, errors, text_cells)
    chosen, rejected = (_answer(record, side, errors) for side in SIDES)
    margin = _margin(record.get("margin"), errors, text_cells)
    if chosen is not None and chosen.strip() == (rejected or "").strip():
        errors.append("'chosen' and 'rejected' are the same answer, so there is no preference to learn; fix or remove the record")
    if errors or context is None or chosen is None or rejected is None:
        return None, errors
    if system_prompt and not any(m["role"] == "system" for m in context):
        context = [{"role": "system", "content": system_prompt}, *context]
    return PreferenceExample(tuple(context), chosen, rejected, margin, where), []


def _context(record: dict, errors: list[str], text_cells: bool) -> list[dict[str, str]] | None:
    """The shared context from ``prompt`` (+ ``system``) or ``messages``; appends problems, None if bad."""
    has_prompt, has_messages = record.get("prompt") is not None, record.get("messages") is not None
    fields = ", ".join(sorted(map(str, record)))
    if has_prompt == has_messages:
        which = "both 'prompt' and 'messages'" if has_prompt else f"no 'prompt' or 'messages' (it has fields: {fields})"
        errors.append(f"record has {which}; give the shared context once, as 'prompt' (a string) or 'messages' (ending with the user turn)")
        return None
    if has_messages:
        if record.get("system") is None:
            return _context_messages(record["messages"], errors, text_cells)
        errors.append("field 'system' is for the prompt format; put a system message first in 'messages' instead")
        return None
    prompt, system = record["prompt"], record.get("system")
    before = len(errors)
    conversation_hint = "; a conversation goes in 'messages' (ending with the user turn)"
    for name, value, hint in (("prompt", prompt, conversation_hint), ("system", system, "")):
        if value is not None and not isinstance(value, str):
            errors.append(f"field '{name}' must be a string, got {describe_type(value)}{hint}")
    if len(errors) > before:
        return None
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": prompt}]


def _context_messages(value: Any, errors: list[str], text_cells: bool) -> list[dict[str, str]] | None:
    """Validate the ``messages`` context: well-formed messages, system first, ending with a user turn."""
    if isinstance(value, str) and text_cells:
        try:
            value = parse_json(value)
        except json.JSONDecodeError as e:
            errors.append(f"field 'messages' is text but not valid JSON: {e}")
            return None
        except JsonValueError as e:
            errors.append(f"field 'messages': {e}")
            return None
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else describe_type(value)
        errors.append(f"field 'messages' must be a non-empty list of {{role, content}} objects, got {got}")
        return None
    before = len(errors)
    messages = [_message(n, m, errors) for n, m in enumerate(value, start=1)]
    if len(errors) > before:
        return None
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        errors.append("a system message must come first in 'messages'; move it to the start")
    if roles[-1] != "user":
        # The usual cause: instruction data (answer as the last message) given as preference data.
        errors.append(f"the context in 'messages' ends with a {roles[-1]!r} message, not the user's; it must end with the user turn "
                      "both answers reply to (put the answers in 'chosen' and 'rejected', not in 'messages')")
    return None if len(errors) > before else messages


def _message(n: int, message: Any, errors: list[str]) -> dict[str, str]:
    """Check context message number ``n`` (1-based), appending its problems."""
    if not isinstance(message, dict):
        errors.append(f"message {n} is {describe_type(message)}, not an object with 'role' and 'content'")
        return {}
    role, content = message.get("role"), message.get("content")
    if role is None or content is None:
        errors.append(f"message {n} has no '{'role' if role is None else 'content'}'; every message needs 'role' and 'content'")
    elif role not in ROLES:
        errors.append(f"message {n} has unknown role {role!r}; allowed roles: {', '.join(ROLES)}")
    elif not isinstance(content, str):
        errors.append(f"message {n} 'content' must be a string, got {describe_type(content)}")
    return {"role": role, "content": content}


def _answer(record: dict, side: str, errors: list[str]) -> str | None:
    """The text of answer ``side``, given as a string or an assistant message; appends problems."""
    value = record.get(side)
    if value is None:
        state = "is null" if side in record else "is missing"
        errors.append(f"field '{side}' {state}; every record needs both a 'chosen' and a 'rejected' answer")
        return None
    if isinstance(value, dict):
        role, value = value.get("role"), value.get("content")
        if role != "assistant":
            kind = "unknown role" if role not in ROLES else "role"
            errors.append(f"field '{side}' is a message with {kind} {role!r}; an answer's role must be 'assistant'")
            return None
        if not isinstance(value, str):
            errors.append(f"field '{side}' 'content' must be a string, got {describe_type(value)}")
            return None
    elif not isinstance(value, str):
        errors.append(f"field '{side}' must be {_ANSWER_SHAPE}, got {describe_type(value)}")
        return None
    if not value.strip():
        errors.append(f"field '{side}' is empty; write the answer or remove the record")
        return None
    return value


def _margin(value: Any, errors: list[str], text_cells: bool) -> float | None:
    """The optional margin as a finite float; appends a problem if it is not a number."""
    if text_cells and isinstance(value, str):
        try:  # an empty CSV cell is an absent margin
            value = float(value) if value.strip() else None
        except ValueError:
            errors.append(f"field 'margin' must be a number, got the text {value!r}")
            return None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        errors.append(f"field 'margin' must be a number, got {describe_type(value)}")
        return None
    if not math.isfinite(value):
        errors.append(f"field 'margin' must be a finite number, got {value}")
        return None
    return float(value)


def tokenize_preferences(
    examples: list[PreferenceExample], tokenizer, *, max_length: int = 1024, too_long: str = "truncate"
) -> tuple[list[TokenizedPair], PreferenceStats]:
    """Tokenize both sides of every pair with the tokenizer's chat template, masking the context.

    Args:
        examples: From :func:`load_preferences`.
        tokenizer: A fast ``transformers`` tokenizer with a chat template (see ``prepare_tokenizer``).
        max_length: Longest allowed side in tokens.
        too_long: ``truncate`` (cut the end of a too-long side, i.e. its answer), ``drop`` (skip the
            pair), or ``error``.

    Returns:
        The kept pairs and statistics over them (dropped sources are listed in the stats).

    Raises:
        DataError: Listing every pair with a side longer than ``max_length`` (``error``), or left without
            any answer token by truncation (``truncate``).
        TunelabError: For bad options, a slow tokenizer, or a template that cannot be masked.
    """
    if too_long not in TOO_LONG:
        raise TunelabError(f"unknown data.too_long {too_long!r}; choose one of: {', '.join(TOO_LONG)}")
    if max_length < 1:
        raise TunelabError(f"data.max_length must be positive, got {max_length}")
    conversations = [ex.side(side) for ex in examples for side in SIDES]
    # Tokenize untruncated (only the last answer trained: earlier assistant turns are context), then
    # apply the length policy per pair, because a pair is kept or refused as a whole.
    sides, _ = tokenize_examples(conversations, tokenizer, loss_on="last_turn", max_length=sys.maxsize)
    pairs: list[TokenizedPair] = []
    stats = PreferenceStats()
    problems: list[str] = []
    for i, example in enumerate(examples):
        chosen, rejected = sides[2 * i], sides[2 * i + 1]
        longest = max(len(chosen.input_ids), len(rejected.input_ids))
        if longest > max_length:
            if too_long == "drop":
                stats.dropped.append(example.source)
                continue
            problem = _length_problem(example.source, chosen, rejected, max_length, too_long)
            if problem:
                problems.append(problem)
                continue
            # Cutting the end keeps the context whole and shortens the answer (checked to keep a token).
            chosen, rejected = (TokenizedExample(s.input_ids[:max_length], s.labels[:max_length], s.source) for s in (chosen, rejected))
            stats.truncated += 1
        pairs.append(TokenizedPair(chosen, rejected, example.margin, example.source))
        _count(stats, chosen, rejected)
    if problems:
        raise DataError(problems, what="tokenized preference data")
    stats.pairs = len(pairs)
    stats.mean_len = stats.tokens / (2 * len(pairs)) if pairs else 0.0
    return pairs, stats


def _length_problem(
    source: str, chosen: TokenizedExample, rejected: TokenizedExample, max_length: int, too_long: str
) -> str | None:
    """Why a too-long pair cannot be kept under ``error`` or ``truncate``, or None if truncation works."""
    if too_long == "error":
        lengths = f"chosen {len(chosen.input_ids)}, rejected {len(rejected.input_ids)} tokens"
        return f"{source}: {lengths} > data.max_length={max_length}; raise data.max_length, or set data.too_long to truncate or drop"
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        context = next(i for i, label in enumerate(side.labels) if label != IGNORE_INDEX)
        if context >= max_length:
            return (
                f"{source}: the context alone takes {context} tokens, so no token of the {name} answer fits in "
                f"data.max_length={max_length}; raise data.max_length, shorten the prompt, or set data.too_long=drop"
            )
    return None


def _count(stats: PreferenceStats, chosen: TokenizedExample, rejected: TokenizedExample) -> None:
    """Add one kept pair to the statistics."""
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        stats.tokens += len(side.input_ids)
        stats.max_len = max(stats.max_len, len(side.input_ids))
        stats.trained_tokens[name] += sum(label != IGNORE_INDEX for label in side.labels)


def collate_pairs(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``B`` pairs into one batch of ``2B`` rows: the chosen sides first, then the rejected.

    Both halves share one width, so a single forward pass scores both and row ``i`` pairs with row
    ``B + i``.

    Args:
        pairs: Tokenized pairs.
        pad_id: Id written into padding positions of ``input_ids``.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` (-100 on the context and padding), ``torch.long``
        of shape ``(2B, T)``, exactly as :func:`tunelab.data.collate` builds them.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def render_pair(example: PreferenceExample, tokenizer) -> dict[str, list[tuple[str, bool]]]:
    """Both sides of a pair as text split into runs of trained and untrained tokens, for display.

    Returns:
        ``{"chosen": runs, "rejected": runs}``, each as :func:`tunelab.data.render_example` gives them:
        ``(text, trained)`` pairs covering the whole side in order, untruncated.
    """
    return {side: render_example(example.side(side), tokenizer, loss_on="last_turn") for side in SIDES}
