"""Score generated answers against references.

Every metric takes the model's predictions and the dataset's references (one string, or a list of
accepted answers, per example) and returns a :class:`MetricResult` with a corpus score in [0, 1], one
score per example and per-example details.

Where a well-kept library already defines a metric we call it rather than re-implement it, so our
numbers match everybody else's: ``rouge-score`` (Google's reference implementation) for ROUGE-L,
``sacrebleu`` (the standard, signature-reproducible implementation) for BLEU and chrF, ``jsonschema``
for schema validation (``json_metrics``) and the standard library's ``sqlite3`` to execute SQL. These libraries are
imported lazily, so a project that never uses a metric never needs its package.

What is ours is what no library decides for us: text normalisation for exact match, label parsing for
classification, stripping Markdown code fences, and comparing SQL *execution results* (multiset versus
ordered comparison, numeric normalisation, one-statement and read-only safety, caps on a result's rows
and bytes, and a query process that is killed when one SQLite function call outlives the timeout, since
SQLite can interrupt a query only between its steps). Those rules are small and documented on each function.

Multiple references: per-example scores are always the maximum over the accepted answers. The BLEU and
chrF corpus scores pass every reference as its own sacrebleu reference stream (padded with ``None`` where
examples have fewer references), which is sacrebleu's own multi-reference scoring.

Built-in metrics register with ``@register_metric`` (``evaluation.scoring``), declaring the options they take;
the JSON metrics live in ``json_metrics`` and SQL execution in ``sql_exec``, registered the same way.

Custom metrics: a metric name of the form ``package.module:function`` imports ``function`` and calls it
as ``fn(prediction, reference, **options)`` per example; it returns a float, a bool or a dict with a
``"score"`` key (the other keys become details). The corpus score is the mean.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from tunelab.errors import TunelabError
from tunelab.evaluation.scoring import (METRICS, MetricResult, import_for_metric, mean, per_example, register_metric,
                                        strip_fence)
from tunelab.registry import load_object

__all__ = ["MetricResult", "metric_names", "uses_tool_reference", "normalize_text", "parse_label", "per_example", "score", "strip_fence"]

Reference = str | list[str]


def normalize_text(text: str) -> str:
    """Strip, collapse runs of whitespace to one space and casefold."""
    return " ".join(text.split()).casefold()


# ---------------------------------------------------------------------------------- string metrics


@register_metric("exact_match", options=("normalize",))
def _exact_match(name: str, preds: list[str], refs: list[list[str]], opts: dict) -> MetricResult:
    norm = normalize_text if opts.get("normalize", True) else (lambda s: s)
    return per_example(name, preds, refs, lambda p, r: (float(norm(p) == norm(r)), {}))


@register_metric("contains", options=("normalize",))
def _contains(name: str, preds: list[str], refs: list[list[str]], opts: dict) -> MetricResult:
    norm = normalize_text if opts.get("normalize", True) else (lambda s: s)
    return per_example(name, preds, refs, lambda p, r: (float(norm(r) in norm(p)), {}))


_REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE, "a": re.ASCII}


def _regex_flags(flags: str | int) -> int:
    if isinstance(flags, int):
        return flags
    value = 0
    for letter in str(flags).lower():
        if letter not in _REGEX_FLAGS:
            raise TunelabError(f"regex metric: unknown flag {letter!r} in flags={flags!r}; use letters from "
                               f"{''.join(_REGEX_FLAGS)} (i=ignore case, m=multiline, s=dotall, x=verbose, a=ascii).")
        value |= _REGEX_FLAGS[letter]
    return value


@register_metric("regex", options=("flags",))
def _regex(name: str, preds: list[str], refs: list[list[str]], opts: dict) -> MetricResult:
    flags = _regex_flags(opts.get("flags", 0))
    compiled: dict[str, re.Pattern] = {}
    for i, accepted in enumerate(refs):
        for pattern in accepted:
            if pattern not in compiled:
                try:
                    compiled[pattern] = re.compile(pattern, flags)
                except re.error as e:
                    raise TunelabError(f"regex metric: the reference of example {i} is not a valid regular "
                                       f"expression: {pattern!r} ({e}). Fix the pattern in the dataset.") from e
    return per_example(name, preds, refs, lambda p, r: (float(compiled[r].search(p) is not None), {}))


@register_metric("rouge_l")
def _rouge_l(name: str, preds: list[str], refs: list[list[str]], opts: dict) -> MetricResult:
    rouge_scorer = import_for_metric("rouge_score.rouge_scorer", "rouge-score", name)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return per_example(name, preds, refs, lambda p, r: (scorer.score(r, p)["rougeL"].fmeasure, {}))


def _sacrebleu(name: str, preds: list[str], refs: list[list[str]], corpus_fn: str, sentence_fn: str) -> MetricResult:
    """Corpus score with one sacrebleu reference stream per reference; per example the best reference."""
    if not preds:
        return MetricResult(name, 0.0, [], [])
    sacrebleu = import_for_metric("sacrebleu", "sacrebleu", name)
    n_streams = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(n_streams)]
    corpus = getattr(sacrebleu, corpus_fn)(preds, streams).score / 100.0
    sentence = getattr(sacrebleu, sentence_fn)
    result = per_example(name, preds, refs, lambda p, r: (sentence(p, [r]).score / 100.0, {}))
    result.score = corpus
    return result


@register_metric("bleu")
def _bleu(name: str, preds: list[str], refs: list[list[str]], opts: dict) -> MetricResult:
    return _sacrebleu(name, preds, refs, "corpus_bleu", "sentence_bleu")


@register_metric("chrf")
def _chrf(name: str, preds: list[str], refs: list[list[str]], opts: dict) -> MetricResult:
    return _sacrebleu(name, preds, refs, "corpus_chrf", "sentence_chrf")


# ------------------------------------------------------------------------------------ classification

_EDGE_PUNCT = " \t\r\n\"'`.,;:!?()[]{}<>*_«»“”‘’"


def parse_label(prediction: str, labels: list[str] | None = None) -> str:
    """The label a prediction names.

    Without ``labels``: the first line, stripped of surrounding punctuation/quotes/Markdown emphasis and
    casefolded. With ``labels``: that first line if it is exactly a label; otherwise the label whose
    whole-word occurrence comes earliest in the prediction (longer labels win ties), or ``""`` if none
    occurs.
    """
    lines = prediction.strip().splitlines()
    first = (lines[0] if lines else "").strip(_EDGE_PUNCT).casefold()
    if labels is None:
        return first
    folded = [label.casefold() for label in labels]
    if first in folded:
        return first
    text = prediction.casefold()
    best: tuple[int, int, str] | None = None
    for label in folded:
        match = re.search(rf"(?<!\w){re.escape(label)}(?!\w)", text)
        if match and (best is None or (match.start(), -len(label)) < best[:2]):
            best = (match.start(), -len(label), label)
    return best[2] if best else ""


@register_metric("accuracy", options=("labels",))
def _accuracy(name: str, preds: list[str], refs: list[list[str]], opts: dict) -> MetricResult:
    labels = opts.get("labels")
    if labels is not None and (not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels)):
        raise TunelabError(f"accuracy metric: option labels must be a list of strings, got {labels!r}.")

    def one(pred: str, ref: str) -> tuple[float, dict]:
        parsed = parse_label(pred, labels)
        return float(parsed == ref.strip().casefold()), {"parsed": parsed}

    return per_example(name, preds, refs, one)


# ---------------------------------------------------------------------------------------------- lookup


def metric_names() -> list[str]:
    """The built-in metric names (custom ``package.module:function`` metrics are not listed)."""
    return METRICS.names()


def uses_tool_reference(metric: str) -> bool:
    """Whether ``metric`` scores against the expected tool calls and tools (``tool_call``) rather than text."""
    return METRICS.find(metric) is not None and bool(METRICS.capabilities(metric).get("tool_reference"))


def _load_custom(metric: str) -> Callable[..., Any]:
    fn = load_object(metric, what="custom metric")
    if not callable(fn):
        module_name, _, fn_name = metric.partition(":")
        raise TunelabError(f"custom metric {metric!r}: module {module_name!r} has no function {fn_name!r} (it is a "
                           f"{type(fn).__name__}); check the spelling of the 'module:function' name.")
    return fn


def _custom(metric: str, preds: list[str], refs: list[Reference], opts: dict) -> MetricResult:
    fn = _load_custom(metric)
    scores, details = [], []
    for i, (pred, ref) in enumerate(zip(preds, refs)):
        value = fn(pred, ref, **opts)
        extra: dict = {}
        if isinstance(value, dict):
            if "score" not in value:
                raise TunelabError(f"custom metric {metric!r} returned a dict without a 'score' key for example {i}; "
                                   "return a float, a bool or a dict with 'score'.")
            extra = {k: v for k, v in value.items() if k != "score"}
            value = value["score"]
        if not isinstance(value, (bool, int, float)):
            raise TunelabError(f"custom metric {metric!r} returned {value!r} for example {i}; "
                               "return a float, a bool or a dict with a 'score' key.")
        scores.append(float(value))
        details.append(extra)
    return MetricResult(metric, mean(scores), scores, details)


def _check_inputs(metric: str, predictions: list[str], references: list[Reference]) -> list[list[str]]:
    if len(predictions) != len(references):
        raise TunelabError(f"metric {metric!r}: {len(predictions)} predictions but {len(references)} references; "
                           "there must be exactly one reference (or list of accepted references) per prediction.")
    refs: list[list[str]] = []
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        accepted = [ref] if isinstance(ref, str) else list(ref) if isinstance(ref, (list, tuple)) else None
        if not isinstance(pred, str):
            raise TunelabError(f"metric {metric!r}: prediction {i} is {type(pred).__name__}, not a string.")
        if not accepted or not all(isinstance(r, str) for r in accepted):
            raise TunelabError(f"metric {metric!r}: reference {i} must be a string or a non-empty list of strings, "
                               f"got {ref!r}.")
        refs.append(accepted)
    return refs


def score(metric: str, predictions: list[str], references: list[Reference], **options: Any) -> MetricResult:
    """Score predictions against references with one metric.

    Args:
        metric: A built-in name (see :func:`metric_names`) or ``package.module:function``.
        predictions: Model outputs, one per example.
        references: One reference per example: a string or a list of accepted strings (the per-example
            score is the best over them).
        **options: Metric options, e.g. ``normalize``, ``flags``, ``labels``, ``schema``, ``db``, ``timeout_s``,
            ``max_rows``, ``max_bytes`` (the last four: see :func:`tunelab.evaluation.sql_exec.sql_exec`).

    Returns:
        The corpus score, per-example scores and per-example details.

    Raises:
        TunelabError: Unknown metric, length mismatch, bad or missing option, failing gold SQL query.
    """
    refs = _check_inputs(metric, predictions, references)
    if ":" in metric:
        return _custom(metric, list(predictions), list(references), options)
    fn = METRICS.find(metric)
    if fn is None:
        raise TunelabError(f"{METRICS.unknown(metric)}, or a custom one written as 'package.module:function'.")
    declared = METRICS.capabilities(metric)
    unknown = sorted(set(options) - declared["options"])
    if unknown:
        raise TunelabError(f"metric {metric!r} does not take option(s) {', '.join(unknown)}; "
                           f"it takes: {', '.join(sorted(declared['options'])) or 'no options'}.")
    missing = sorted(k for k in declared["required"] if options.get(k) is None)
    if missing:
        raise TunelabError(f"metric {metric!r} needs option(s) {', '.join(missing)}; pass {declared['hint']}.")
    return fn(metric, list(predictions), refs, options)
