"""What every metric shares: the result type, the per-example loop, fence stripping, lazy library imports, and
the registry the metrics of ``metrics``, ``json_metrics``, ``sql_exec`` and ``tool_metrics`` register in.

A leaf of ``tunelab.evaluation``: the metric modules import it and it imports none of them (the registry
imports them by name on its first lookup), so no metric module imports another to share a helper.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from tunelab.errors import TunelabError
from tunelab.registry import Registry


@dataclass
class MetricResult:
    """The score of one metric over a set of examples.

    Attributes:
        name: The metric name as requested.
        score: Corpus-level score in [0, 1] (BLEU and chrF are divided by 100).
        per_example: One value per example, in input order.
        details: Per-example extra information (e.g. ``{"error": ...}``); may be empty dicts.
    """

    name: str
    score: float
    per_example: list[float] = field(default_factory=list)
    details: list[dict] = field(default_factory=list)


# A built-in metric: (name as requested, predictions, accepted references per example, options) -> result.
MetricFn = Callable[[str, list[str], list[list[str]], dict], MetricResult]

METRICS: Registry[MetricFn] = Registry("metric", modules=("tunelab.evaluation.metrics", "tunelab.evaluation.json_metrics",
                                                          "tunelab.evaluation.sql_exec", "tunelab.evaluation.tool_metrics"))


def register_metric(name: str, *, options: tuple[str, ...] = (), required: tuple[str, ...] = (),
                    hint: str = "", tool_reference: bool = False) -> Callable[[MetricFn], MetricFn]:
    """Decorator: register a built-in metric under ``name``, declaring the options it takes.

    Args:
        name: The metric's name in configs and :func:`tunelab.evaluation.metrics.score`.
        options: Every option it reads; any other is reported as a typo.
        required: Options without which it cannot score.
        hint: What a required option should be, for the error message (``"db=<path of a SQLite database file>"``).
        tool_reference: Its references are the expected tool calls and the record's tools
            (``tool_metrics.tool_reference``), not the text of the last assistant message.
    """
    return METRICS.decorator(name, options=frozenset(options), required=frozenset(required), hint=hint,
                             tool_reference=tool_reference)


def mean(values: list[float]) -> float:
    """The mean, 0.0 for no values."""
    return sum(values) / len(values) if values else 0.0


def import_for_metric(module: str, package: str, metric: str):
    """Import ``module`` for ``metric``; a TunelabError naming the package to install when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TunelabError(
            f"metric {metric!r} needs the Python package {package!r}, which is not installed ({e}). "
            f"Install it with `pip install {package}`."
        ) from e


def per_example(name: str, preds: list[str], refs: list[list[str]],
                fn: Callable[[str, str], tuple[float, dict]]) -> MetricResult:
    """Apply ``fn(prediction, reference) -> (score, details)``; keep the best reference per example."""
    scores, details = [], []
    for pred, accepted in zip(preds, refs):
        best = max((fn(pred, ref) for ref in accepted), key=lambda sd: sd[0])
        scores.append(float(best[0]))
        details.append(best[1])
    return MetricResult(name, mean(scores), scores, details)


_FENCE = re.compile(r"^```[ \t]*(\w+)?[ \t]*\n?(.*?)\n?[ \t]*```$", re.DOTALL)


def strip_fence(text: str) -> str:
    """Return the body of a Markdown code fence (```lang ... ```) if the whole text is one, else the text."""
    text = text.strip()
    match = _FENCE.match(text)
    return match.group(2).strip() if match else text

