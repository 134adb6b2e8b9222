"""The ``tool_call`` metric: did the model call the right functions with the right arguments, or answer when no
call was expected? Also the scoring behind the ``tool_call`` GRPO reward.

The prediction is read with :func:`tunelab.data.tool_parse.parse_tool_calls` (Hermes/Qwen ``<tool_call>``
blocks, tunelab's fallback, Llama 3 bare JSON). The reference is what :func:`tool_reference` writes for an
eval record's last assistant message: ``{"tool_calls": [...], "content": ..., "tools": [...]}`` as JSON; any
other reference string is read like a prediction (``<tool_call>`` blocks, else a plain answer expected).

Per example (``details``):

* the calls are paired with the expected ones order-insensitively (parallel calls), the pairing that gives
  the most credit; ``names``: the share of expected calls whose paired call has the right function name;
  ``arguments``: the share whose arguments are exactly right after JSON normalisation (key order ignored,
  ``3`` equals ``3.0``, strings exact); ``argument_credit``: per-argument credit, the arguments right over the
  arguments named by either side, averaged over the expected calls (an unpaired call gets 0);
* ``schema_valid``: every predicted call names one of the record's tools and its arguments satisfy that
  function's JSON schema (``schema_errors`` say how not); None when the record lists no tools;
* ``decision``: ``right``, ``answered instead of calling`` or ``called instead of answering``;
* ``partial``: the reward's score, a call's credit being ``(1 + argument credit) / 2`` with the right name and
  0 without, summed over the pairs and divided by the larger of the expected and the predicted count (a
  missing or an extra call costs); a plain answer expected scores 1 for an answer, 0 for any call.

The example's score (``per_example``, and its mean the headline) is **exact**: as many calls as expected, all
readable, each with the right name and exactly the right arguments; with no call expected, an answer without
any call (or unreadable call block) is right.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from tunelab.data.tool_parse import parse_tool_calls, plain_calls, schema_problems
from tunelab.errors import TunelabError
from tunelab.evaluation.scoring import per_example, register_metric

_MAX_PERMUTED = 6  # calls paired by trying every order up to this many; greedily beyond


def tool_reference(message: dict, tools: Any) -> str:
    """The ``tool_call`` metric's reference for an eval record's last assistant ``message`` and its ``tools``."""
    calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in message.get("tool_calls") or ()]
    return json.dumps({"tool_calls": calls, "content": message.get("content") or "", "tools": list(tools or ())},
                      ensure_ascii=False)


def _read_reference(reference: str) -> tuple[list[dict], Any]:
    """(expected calls, tools or None) of one reference (see the module docstring)."""
    try:
        value = json.loads(reference)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, dict) and "tool_calls" in value:
        try:
            return plain_calls(value["tool_calls"]), value.get("tools") or None
        except ValueError as e:
            raise TunelabError(f"tool_call metric: a reference's tool_calls cannot be read: {e}") from None
    return parse_tool_calls(reference).calls, None


def normalize(value: Any) -> Any:
    """A JSON value in a canonical form: numbers as floats (booleans kept), objects with sorted keys."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), normalize(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("__list__", *map(normalize, value))
    return repr(value)


def argument_credit(predicted: dict, expected: dict) -> float:
    """The arguments with the expected value over the arguments either side names (1.0 when both have none)."""
    keys = set(predicted) | set(expected)
    if not keys:
        return 1.0
    right = sum(k in predicted and k in expected and normalize(predicted[k]) == normalize(expected[k]) for k in keys)
    return right / len(keys)


def _pair_credit(predicted: dict, expected: dict) -> tuple[bool, bool, float]:
    """(name right, arguments exact, argument credit) of a predicted call against an expected one."""
    if predicted["name"] != expected["name"]:
        return False, False, 0.0
    exact = normalize(predicted["arguments"]) == normalize(expected["arguments"])
    return True, exact, 1.0 if exact else argument_credit(predicted["arguments"], expected["arguments"])


def _best_pairing(predicted: list[dict], expected: list[dict]) -> list[tuple[bool, bool, float]]:
    """Per paired call (name, exact, credit), the pairing of predicted to expected calls with the most credit."""
    table = [[_pair_credit(p, e) for e in expected] for p in predicted]

    def value(cell: tuple[bool, bool, float]) -> float:
        return cell[0] + cell[1] + cell[2]

    if max(len(predicted), len(expected)) <= _MAX_PERMUTED:
        if len(predicted) >= len(expected):
            pairings = (list(zip(rows, range(len(expected)))) for rows in itertools.permutations(range(len(predicted)), len(expected)))
        else:
            pairings = (list(zip(range(len(predicted)), cols)) for cols in itertools.permutations(range(len(expected)), len(predicted)))
        best = max(pairings, key=lambda pairs: sum(value(table[p][e]) for p, e in pairs), default=[])
        return [table[p][e] for p, e in best]
    free_p, free_e, cells = set(range(len(predicted))), set(range(len(expected))), []
    for p, e in sorted(itertools.product(free_p, free_e), key=lambda pe: -value(table[pe[0]][pe[1]])):
        if p in free_p and e in free_e:
            free_p.discard(p)
            free_e.discard(e)
            cells.append(table[p][e])
    return cells


def score_calls(prediction: str, expected: list[dict], tools: Any = None) -> tuple[float, dict]:
    """Score one answer against the expected calls (``{"name", "arguments": dict}``; none: an answer expected).

    Returns:
        ``(exact: 0.0 or 1.0, details)`` as described in the module docstring.
    """
    parsed = parse_tool_calls(prediction)
    called = bool(parsed.calls or parsed.problems)
    details: dict[str, Any] = {"expected_calls": len(expected), "predicted_calls": len(parsed.calls)}
    if parsed.problems:
        details["unparsable"] = parsed.problems
    if tools:
        errors = schema_problems(parsed.calls, tools)
        details["schema_valid"] = not errors and not parsed.problems
        if errors:
            details["schema_errors"] = errors
    else:
        details["schema_valid"] = None
    if not expected:
        details["decision"] = "called instead of answering" if called else "right"
        details["partial"] = 0.0 if called else 1.0
        return details["partial"], details
    details["decision"] = "right" if called else "answered instead of calling"
    cells = _best_pairing(parsed.calls, expected)
    details["names"] = sum(c[0] for c in cells) / len(expected)
    details["arguments"] = sum(c[1] for c in cells) / len(expected)
    details["argument_credit"] = sum(c[2] for c in cells) / len(expected)
    predicted = len(parsed.calls) + len(parsed.problems)
    details["partial"] = sum((1 + c[2]) / 2 for c in cells if c[0]) / max(predicted, len(expected))
    exact = predicted == len(expected) and len(cells) == len(expected) and all(c[1] for c in cells)
    return float(exact), details


@register_metric("tool_call", tool_reference=True)
def tool_call(name: str, preds: list[str], refs: list[list[str]], opts: dict):
    """The ``tool_call`` metric (module docstring): exact calls per example, with their breakdown in details."""

    def one(pred: str, ref: str) -> tuple[float, dict]:
        expected, tools = _read_reference(ref)
        return score_calls(pred, expected, tools)

    return per_example(name, preds, refs, one)
