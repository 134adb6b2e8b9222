"""The recommendation of a comparison: which candidate to use, or not to fine-tune at all, and why in numbers.

Rules (:func:`choose`), in order:

1. Failed and skipped candidates, and finished ones without a score, are excluded and listed with their
   error. If nothing is left there is no recommendation.
2. A score is *within tolerance* of a reference when it is at most ``abs_tol`` below it (default 0.02,
   i.e. 2 points) **or** at least ``rel_tol`` of it (default 97%).
3. If the best baseline (no training: zero/few-shot, RAG) is within tolerance of the best trained
   candidate, or above it, the advice is **not to fine-tune** and to use that baseline.
4. Otherwise, among the trained candidates within tolerance of the best trained score, prefer higher
   probe retention (a measured retention before an unmeasured one), then fewer trainable parameters,
   then a smaller artifact, then less training time, then the higher score, then the order given.
   The text names the criterion that decided against the runner-up and states the numbers.

No library turns fine-tuning results into such advice, hence this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tunelab.compare.results import NONE, CandidateResult, format_count, format_mb, format_param_share, format_score, format_seconds

ABS_TOL = 0.02
REL_TOL = 0.97


# ---------------------------------------------------------------------------------------------------
# Recommendation.


@dataclass(frozen=True)
class Recommendation:
    """What to use and why.

    Attributes:
        choice: The recommended candidate's name; None when nothing finished.
        fine_tune: True = use the trained ``choice``; False = a baseline is as good, do not fine-tune;
            None = undecided (nothing finished, or only baselines did).
        text: The reasoning, in numbers, ending with the verdict.
    """

    choice: str | None
    fine_tune: bool | None
    text: str


def within(score: float, reference: float, abs_tol: float = ABS_TOL, rel_tol: float = REL_TOL) -> bool:
    """``score`` is at most ``abs_tol`` below ``reference`` or at least ``rel_tol`` of it (or above it)."""
    eps = 1e-9  # 0.80 - 0.78 is 0.020000000000000018 in floating point
    return reference - score <= abs_tol + eps or score >= rel_tol * reference - eps


def _best(candidates: list[CandidateResult]) -> CandidateResult:
    """Highest score; the earliest listed on a tie."""
    return max(candidates, key=lambda c: c.score)  # max keeps the first maximum it meets


def _ratio(score: float, reference: float) -> str:
    return f"{100 * score / reference:.1f}%" if reference > 0 else "the same"


def _lost(c: CandidateResult) -> str:
    n = len(c.probe_lost)
    return f"{n} probe item{'s' if n != 1 else ''}"


def _preference(item: tuple[int, CandidateResult]) -> tuple:
    index, c = item
    inf = math.inf
    retention = (0, -c.retention) if c.retention is not None else (1, 0.0)
    return (retention, c.trainable_parameters if c.trainable_parameters is not None else inf,
            c.artifact_mb if c.artifact_mb is not None else inf,
            c.train_seconds if c.train_seconds is not None else inf, -c.score, index)


def _deciding(a: tuple, b: tuple) -> int:
    """Index of the first preference criterion (see ``_preference``) on which two candidates differ."""
    return next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), len(a) - 1)


def _why_over(chosen: CandidateResult, other: CandidateResult, criterion: int) -> str:
    """Why ``chosen`` beats ``other`` on preference ``criterion``, with both numbers."""
    if criterion == 0:
        if other.retention is None:
            return f"its forgetting was measured (retention {format_score(chosen.retention)}) and {other.name}'s was not"
        return (f"it keeps more of the probe (retention {format_score(chosen.retention)} vs {format_score(other.retention)}; "
                f"loses {_lost(chosen)} instead of {len(other.probe_lost)})")
    if criterion == 1:
        return (f"it trains fewer parameters ({format_count(chosen.trainable_parameters)} vs "
                f"{format_count(other.trainable_parameters)})")
    if criterion == 2:
        return f"its artifact is smaller ({format_mb(chosen.artifact_mb)} vs {format_mb(other.artifact_mb)})"
    if criterion == 3:
        return f"it trains faster ({format_seconds(chosen.train_seconds)} vs {format_seconds(other.train_seconds)})"
    if criterion == 4:
        return f"it scores higher ({format_score(chosen.score)} vs {format_score(other.score)})"
    return "it is listed first and everything else is equal"


def choose(candidates: list[CandidateResult], abs_tol: float = ABS_TOL, rel_tol: float = REL_TOL) -> Recommendation:
    """Apply the recommendation rules (see the module docstring) and explain the outcome in numbers."""
    usable = [c for c in candidates if c.usable]
    note = _excluded_note([c for c in candidates if not c.usable])
    if not usable:
        return Recommendation(None, None, "No candidate finished with a score, so there is nothing to recommend; "
                                          "fix the failures and run the comparison again." + note)
    metric = next((c.metric for c in usable if c.metric), "score")
    tolerance = f"within {100 * abs_tol:.1f} points or {100 * rel_tol:.0f}% of the best"
    trained = [c for c in usable if c.kind == "trained"]
    baselines = [c for c in usable if c.kind == "baseline"]

    if not trained:
        b = _best(baselines)
        return Recommendation(b.name, None, (
            f"No fine-tuned candidate finished, so only baselines can be compared: {b.name} scores "
            f"{format_score(b.score)} ({metric}) without training. Use {b.name} for now; whether fine-tuning "
            f"beats it is still open." + note))

    best = _best(trained)
    if baselines:
        b = _best(baselines)
        if within(b.score, best.score, abs_tol, rel_tol):
            relation = (f"above the best fine-tune ({best.name}, {format_score(best.score)})" if b.score > best.score else
                        f"{_ratio(b.score, best.score)} of the best fine-tune's score ({best.name}, {format_score(b.score)} vs "
                        f"{format_score(best.score)}; {tolerance})")
            return Recommendation(b.name, False, (
                f"{b.name} scores {format_score(b.score)} ({metric}) without any training, {relation}. "
                f"Do not fine-tune: use {b.name}, which leaves the model untouched (no forgetting, no artifact to ship)." + note))

    ranked = sorted([(i, c) for i, c in enumerate(trained) if within(c.score, best.score, abs_tol, rel_tol)], key=_preference)
    chosen = ranked[0][1]
    parts = _reasons(chosen, best, trained, ranked, metric, tolerance)
    if baselines:
        b = _best(baselines)
        parts.append(f"Fine-tuning pays: the best baseline without training, {b.name}, scores {format_score(b.score)}")
    return Recommendation(chosen.name, True, ". ".join(parts) + f". Choose {chosen.name}." + note)


def _excluded_note(excluded: list[CandidateResult]) -> str:
    """The sentence listing the candidates left out of the recommendation, and why; empty if none."""
    if not excluded:
        return ""
    return " Excluded: " + "; ".join(
        f"{c.name} ({c.status}: {c.error or 'no score recorded'})" if c.status != "finished" else f"{c.name} (finished but no score recorded)"
        for c in excluded) + "."


def _reasons(chosen: CandidateResult, best: CandidateResult, trained: list[CandidateResult], ranked: list,
             metric: str, tolerance: str) -> list[str]:
    """Why ``chosen`` among the fine-tunes (``ranked``: those within tolerance, preferred first), in numbers."""
    parts: list[str] = []
    if len(trained) == 1:
        parts.append(f"{chosen.name} is the only fine-tune that finished ({format_score(chosen.score)} {metric})")
    elif chosen is best:
        parts.append(f"{chosen.name} has the best {metric} score ({format_score(chosen.score)})")
    else:
        parts.append(f"{chosen.name} reaches {_ratio(chosen.score, best.score)} of {best.name}'s score "
                     f"({format_score(chosen.score)} vs {format_score(best.score)}; {tolerance})")
    deciding = None
    if len(ranked) > 1:
        runner = ranked[1][1]
        deciding = _deciding(_preference(ranked[0]), _preference(ranked[1]))
        names = ", ".join(c.name for _, c in ranked)
        parts.append(f"Of the fine-tunes within tolerance ({names}), it is preferred over {runner.name} because "
                     + _why_over(chosen, runner, deciding))
        said = {(runner.name, deciding)}
    else:
        said = set()
        if len(trained) > 1:
            rest = max((c for c in trained if c is not chosen), key=lambda c: c.score)
            parts.append(f"No other fine-tune is {tolerance}; the next is {rest.name} at {format_score(rest.score)}")
    if chosen is not best:  # what the score given up buys, unless the reason above already said it
        share, best_share = (format_param_share(x.trainable_parameters, x.total_parameters) for x in (chosen, best))
        facts = []
        if share != NONE and best_share != NONE and (best.name, 1) not in said:
            facts.append(f"trains {share} of the parameters instead of {best_share}")
        if chosen.retention is not None and best.retention is not None and (best.name, 0) not in said:
            facts.append(f"loses {_lost(chosen)} instead of {len(best.probe_lost)}")
        if facts:
            parts.append(f"Against {best.name} it " + " and ".join(facts))
    if chosen.retention is None:
        parts.append("Its forgetting was not measured (no probe result)")
    elif deciding != 0 and (chosen is best or best.retention is None):
        parts.append(f"It keeps {format_score(chosen.retention)} of the probe (loses {_lost(chosen)})")
    return parts


def recommend(candidates: list[CandidateResult], abs_tol: float = ABS_TOL, rel_tol: float = REL_TOL) -> str:
    """The recommendation text of :func:`choose`."""
    return choose(candidates, abs_tol, rel_tol).text
