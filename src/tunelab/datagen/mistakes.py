"""Preference pairs from a model's own mistakes: the reference as chosen, the model's wrong answer as rejected.

The model answers the (training) examples greedily, as ``tunelab eval`` does (same decoding, same
``strip``), every answer is scored with one of :mod:`tunelab.evaluation.metrics`, and each example scored
below a threshold becomes a pair in the format :func:`tunelab.data.preferences.load_preferences` reads.
The run's evaluation split is refused: pairs made from it would train on the questions its held-out score
is measured on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data import Example, data_fingerprint
from tunelab.datagen.generate import OnBatch, complete
from tunelab.errors import TunelabError
from tunelab.evaluation.metrics import score
from tunelab.evaluation.run import LoadedModel, split_example
from tunelab.generation import SamplingSettings
from tunelab.runs import Run


@dataclass
class MistakeSummary:
    """What scoring the model on the data found."""

    n_examples: int = 0
    n_wrong: int = 0
    n_pairs: int = 0
    score: float = 0.0  # the metric's corpus score, as tunelab eval would report it
    skipped: list[dict[str, str]] = field(default_factory=list)  # wrong answers that cannot be a pair, with why
    seconds: float = 0.0


def eval_files(run: Run) -> list[str]:
    """The evaluation data files the run recorded (``data.eval`` of its config), as written there."""
    value = (run.config.get("data") or {}).get("eval")
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def refuse_eval_split(run: Run, data: str | Path) -> None:
    """Refuse ``data`` if it is the run's evaluation split: the same path, or a file with the same bytes.

    Raises:
        TunelabError: ``data`` is (a copy of) one of the run's ``data.eval`` files.
    """
    target = Path(data).expanduser().resolve()
    digest = data_fingerprint([str(target)]) if target.exists() else None
    for recorded in eval_files(run):
        path = Path(recorded).expanduser()
        same_path = path.resolve() == target
        # A copy of the eval file elsewhere is the same leak, so compare contents too.
        same_bytes = digest is not None and path.exists() and path.is_dir() == target.is_dir() \
            and data_fingerprint([str(path)]) == digest
        if same_path or same_bytes:
            how = "is" if same_path else "has the same content as"
            raise TunelabError(
                f"--data {data} {how} the run's evaluation split (data.eval: {recorded} in {run.path / 'config.yaml'}); "
                "pairs made from it would train on the held-out questions and inflate the run's score. "
                "Use the training data (data.train) or another file the evaluation never sees")


def find_mistakes(loaded: LoadedModel, examples: list[Example], metric: str, options: dict[str, Any], *,
                  max_new_tokens: int = 128, batch_size: int = 16, threshold: float = 1.0,
                  model: str = "", on_batch: OnBatch | None = None) -> tuple[list[dict], MistakeSummary]:
    """Answer every example greedily, score the answers, and make a pair of each wrong one.

    Args:
        loaded: The model (e.g. from :func:`tunelab.evaluation.run.load_for_eval`).
        examples: Conversations whose final assistant message is the reference.
        metric: A metric name of :func:`tunelab.evaluation.metrics.score` (or ``module:function``).
        options: The metric's options (``db`` for ``sql_exec``, ...).
        max_new_tokens: Longest generated answer.
        batch_size: Prompts per generation batch.
        threshold: An answer scoring below it is wrong.
        model: What to record as the model in each pair's ``meta``.
        on_batch: Progress callback.

    Returns:
        The pairs (``{"messages": context, "chosen": reference, "rejected": answer, "meta": ...}``), in example
        order, and the summary.
    """
    if metric in ("loss", "perplexity"):
        raise TunelabError(f"--metric {metric} scores references, not answers; choose a metric that scores an answer "
                           "(exact_match, sql_exec, json_valid, ...)")
    if not 0 < threshold <= 1:
        raise TunelabError(f"--threshold {threshold}: use a score in (0, 1]; answers scoring below it are wrong")
    score(metric, [], [], **options)  # an unknown metric or a missing option fails now, before generating
    started = time.time()
    conversations, references = zip(*(split_example(e) for e in examples)) if examples else ((), ())
    completions = complete(loaded, conversations, SamplingSettings(temperature=0.0, max_new_tokens=max_new_tokens),
                           batch_size=batch_size, on_batch=on_batch)
    predictions = [c.text.strip() for c in completions]  # as tunelab eval scores them
    result = score(metric, predictions, list(references), **options)
    summary = MistakeSummary(n_examples=len(examples), score=result.score)
    details = result.details or [{}] * len(examples)
    pairs = []
    for example, context, reference, answer, value, detail in zip(examples, conversations, references, predictions,
                                                                  result.per_example, details):
        if value >= threshold:
            continue
        summary.n_wrong += 1
        reason = _unusable(context, reference, answer)
        if reason:
            summary.skipped.append({"source": example.source, "reason": reason})
            continue
        meta = {"source": example.source, "model": model, "metric": metric, "score": value, **({"details": detail} if detail else {})}
        pairs.append({"messages": context, "chosen": reference, "rejected": answer, "meta": meta})
    summary.n_pairs = len(pairs)
    summary.seconds = round(time.time() - started, 2)
    return pairs, summary


def _unusable(context: list[dict], reference: str, answer: str) -> str | None:
    """Why a wrong answer cannot be written as a valid preference pair, or None if it can."""
    if not answer.strip():
        return "the model's answer is empty (a pair needs a rejected answer to push down)"
    if answer.strip() == reference.strip():
        return "the answer equals the reference text yet scored below the threshold (no preference to learn)"
    if not context or context[-1]["role"] != "user":
        return "the conversation before the reference does not end with a user turn"
    return None
