"""The comparison report: one row per candidate, three plots, and a recommendation with its reasons.

The sweep hands over one :class:`CandidateResult` per candidate (baselines such as ``zero_shot``,
``few_shot``, ``rag`` and trained methods such as ``lora`` or ``full``); :func:`write_report` renders them
into ``report.md`` (plots as SVG files in ``report-plots/``), a self-contained ``report.html`` (inline
CSS, inline SVG plots, no external URL) and ``report.json`` (the raw records, the strings shown for them
and the recommendation). Every file is rendered in memory first and then written atomically, so a
failure leaves the previous report (or none) in place, never a partial one.

Every number shown is formatted from the records by one function per unit (:func:`display`), used by all
three files, so the markdown, the HTML and the JSON's ``display`` strings agree to the character.
Scores and retention are percentages with one decimal (``format_score``).

Recommendation rules (:func:`choose`), in order:

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

No library turns fine-tuning results into such a report, hence this module; plotting is matplotlib's
(object-oriented ``Figure`` API, no pyplot, so no GUI backend is ever touched), templating is Jinja's.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import jinja2

from tunelab.atomic import write_text_atomic
from tunelab.errors import TunelabError

KINDS = ("baseline", "trained")
STATUSES = ("finished", "failed", "skipped")
ABS_TOL = 0.02
REL_TOL = 0.97
PLOTS_DIR = "report-plots"
UNTOUCHED = "— (untouched)"
NONE = "—"


@dataclass
class CandidateResult:
    """What one candidate of a sweep scored, forgot and cost. See the sweep for how each field is measured.

    Attributes:
        name: ``zero_shot``, ``few_shot``, ``rag``, ``prompt``, ``prefix``, ``lora``, ``full``, ...
        kind: ``baseline`` (the untouched model, prompted) or ``trained``.
        status: ``finished``, ``failed`` or ``skipped``; ``error`` says why for the last two.
        score: The task metric (0..1) on the eval set.
        retention: Share of the probe items the untuned model got right that this one still gets right;
            None for baselines (they do not change the model) or when no probe ran.
        probe_lost: Ids of the probe items lost.
        peak_memory_kind: ``cuda_max_allocated`` or ``cpu_peak_rss``.
        loss_curve: ``(step, train loss)`` pairs.
        extra: Any further fields of the record, kept so a record survives a round trip unchanged.
    """

    name: str
    kind: Literal["baseline", "trained"]
    status: Literal["finished", "failed", "skipped"]
    error: str | None = None
    run_dir: str | None = None
    metric: str = ""
    score: float | None = None
    retention: float | None = None
    probe_right_before: int | None = None
    probe_right_after: int | None = None
    probe_items: int | None = None
    probe_lost: list[str] = field(default_factory=list)
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    artifact_mb: float | None = None
    peak_memory_mb: float | None = None
    peak_memory_kind: str | None = None
    train_seconds: float | None = None
    tokens_per_s: float | None = None
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> CandidateResult:
        """Build from a record (e.g. read from ``report.json`` or written by the sweep).

        ``probe_lost`` may hold ids or eval.json's ``{"id", ...}`` dicts; ``loss_curve`` pairs may be
        lists. Unknown keys go to ``extra``.

        Raises:
            TunelabError: On a missing name or an unknown kind or status.
        """
        if not isinstance(record, dict) or not isinstance(record.get("name"), str):
            raise TunelabError(f"candidate record needs a 'name' string, got {record!r:.200}")
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in record.items() if k in known}
        extra = {**record.get("extra", {}), **{k: v for k, v in record.items() if k not in known and k != "extra"}}
        name = values["name"]
        if values.get("kind") not in KINDS:
            raise TunelabError(f"candidate {name!r}: kind must be one of {', '.join(KINDS)}, got {values.get('kind')!r}")
        if values.get("status") not in STATUSES:
            raise TunelabError(f"candidate {name!r}: status must be one of {', '.join(STATUSES)}, got {values.get('status')!r}")
        values["probe_lost"] = [str(x["id"]) if isinstance(x, dict) else str(x) for x in values.get("probe_lost") or []]
        values["loss_curve"] = [(int(step), float(loss)) for step, loss in values.get("loss_curve") or []]
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record; ``from_dict(to_dict())`` gives the same candidate back."""
        record = asdict(self)
        record["loss_curve"] = [[step, loss] for step, loss in self.loss_curve]
        extra = record.pop("extra")
        return {**record, **extra}

    @property
    def usable(self) -> bool:
        """Finished with a score: takes part in the plots and the recommendation."""
        return self.status == "finished" and self.score is not None


# ---------------------------------------------------------------------------------------------------
# Formatting: the only place numbers become text.


def format_score(value: float | None) -> str:
    """A 0..1 score or retention as a percentage with one decimal (``0.7812`` -> ``"78.1%"``)."""
    return NONE if value is None else f"{100 * value:.1f}%"


def format_count(n: int | None) -> str:
    """A parameter count in K/M/B (``134515008`` -> ``"134.5M"``)."""
    if n is None:
        return NONE
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def format_param_share(trainable: int | None, total: int | None) -> str:
    """Trainable share of all parameters, three significant digits (``"0.449%"``, ``"100%"``)."""
    if trainable is None or not total:
        return NONE
    return f"{100 * trainable / total:.3g}%"


def format_mb(value: float | None) -> str:
    if value is None:
        return NONE
    if value >= 1024:
        return f"{value / 1024:.2f} GB"
    return f"{value:.1f} MB" if value >= 1 else f"{value * 1024:.1f} KB"


def format_seconds(value: float | None) -> str:
    if value is None:
        return NONE
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{int(value // 60)} min {int(value % 60):02d} s"
    return f"{int(value // 3600)} h {int(value % 3600 // 60):02d} min"


def format_memory(value: float | None, kind: str | None) -> str:
    if value is None:
        return NONE
    where = {"cuda_max_allocated": "GPU", "cpu_peak_rss": "CPU RSS"}.get(kind or "", kind)
    return f"{format_mb(value)} ({where})" if where else format_mb(value)


def _probe_text(c: CandidateResult) -> str:
    if c.probe_right_before is None or c.probe_right_after is None:
        return NONE
    of = f" of {c.probe_items}" if c.probe_items is not None else ""
    return f"{c.probe_right_before} → {c.probe_right_after}{of}"


def _loss_text(curve: list[tuple[int, float]]) -> str:
    if not curve:
        return NONE
    (first_step, first), (last_step, last) = curve[0], curve[-1]
    return f"{first:.3f} → {last:.3f} (steps {first_step}–{last_step})"


COLUMNS = (
    ("name", "candidate"), ("kind", "kind"), ("status", "status"), ("score", "score"), ("retention", "probe retention"),
    ("probe", "probe right before → after"), ("probe_lost", "probe items lost"), ("trainable", "trainable params"),
    ("total_parameters", "total params"), ("artifact_mb", "artifact"), ("peak_memory", "peak memory"),
    ("train_seconds", "train time"), ("tokens_per_s", "train throughput"), ("loss", "train loss first → last"),
    ("eval_seconds", "eval time"), ("run_dir", "run dir"), ("error", "error"),
)


def display(c: CandidateResult) -> dict[str, str]:
    """The text shown for each column of the table (keys of ``COLUMNS``)."""
    baseline = c.kind == "baseline"
    if baseline and c.retention is None:
        retention = UNTOUCHED
    else:
        retention = format_score(c.retention)
    trainable = NONE
    if c.trainable_parameters is not None:
        share = format_param_share(c.trainable_parameters, c.total_parameters)
        trainable = format_count(c.trainable_parameters) + (f" ({share})" if share != NONE else "")
    return {
        "name": c.name, "kind": c.kind, "status": c.status,
        "score": format_score(c.score) + (f" {c.metric}" if c.metric and c.score is not None else ""),
        "retention": retention,
        "probe": _probe_text(c),
        "probe_lost": (", ".join(c.probe_lost) if c.probe_lost else ("none" if c.retention is not None else NONE)),
        "trainable": trainable,
        "total_parameters": format_count(c.total_parameters),
        "artifact_mb": format_mb(c.artifact_mb),
        "peak_memory": format_memory(c.peak_memory_mb, c.peak_memory_kind),
        "train_seconds": format_seconds(c.train_seconds),
        "tokens_per_s": NONE if c.tokens_per_s is None else f"{c.tokens_per_s:,.0f} tok/s",
        "loss": _loss_text(c.loss_curve),
        "eval_seconds": format_seconds(c.eval_seconds),
        "run_dir": c.run_dir or NONE,
        "error": c.error or NONE,
    }


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
    excluded = [c for c in candidates if not c.usable]
    note = ""
    if excluded:
        note = " Excluded: " + "; ".join(
            f"{c.name} ({c.status}: {c.error or 'no score recorded'})" if c.status != "finished" else f"{c.name} (finished but no score recorded)"
            for c in excluded) + "."
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

    shortlist = [(i, c) for i, c in enumerate(trained) if within(c.score, best.score, abs_tol, rel_tol)]
    ranked = sorted(shortlist, key=_preference)
    chosen = ranked[0][1]
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
    if baselines:
        b = _best(baselines)
        parts.append(f"Fine-tuning pays: the best baseline without training, {b.name}, scores {format_score(b.score)}")
    return Recommendation(chosen.name, True, ". ".join(parts) + f". Choose {chosen.name}." + note)


def recommend(candidates: list[CandidateResult], abs_tol: float = ABS_TOL, rel_tol: float = REL_TOL) -> str:
    """The recommendation text of :func:`choose`."""
    return choose(candidates, abs_tol, rel_tol).text


# ---------------------------------------------------------------------------------------------------
# Plots: matplotlib figures as SVG text.


def _svg(figure) -> str:
    """A figure as standalone SVG text; deterministic ids, text kept as text so names stay searchable."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "tunelab", "svg.fonttype": "none"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})  # constrained layout fits it
    return buffer.getvalue()


def inline_svg(svg: str) -> str:
    """SVG text made fit for inlining into HTML5: no XML prolog, doctype, metadata or namespace URLs.

    The HTML parser gives ``<svg>`` and its ``xlink:`` attributes their namespaces itself.
    """
    svg = re.sub(r"<\?xml.*?\?>\s*", "", svg, flags=re.S)
    svg = re.sub(r"<!DOCTYPE.*?>\s*", "", svg, flags=re.S)
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    return re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_learned_vs_forgot(candidates: list[CandidateResult], chosen: str | None) -> str | None:
    """Scatter: x = task score, y = probe retention (baselines at 1.0), one labelled point per candidate."""
    points = [(c, 1.0 if c.kind == "baseline" and c.retention is None else c.retention) for c in candidates if c.usable]
    points = [(c, r) for c, r in points if r is not None]
    if not points:
        return None
    figure = _figure(6.4, 4.6)
    axes = figure.subplots()
    for kind, marker, colour in (("baseline", "s", "#7f7f7f"), ("trained", "o", "#1f77b4")):
        chosen_kind = [(c, r) for c, r in points if c.kind == kind]
        if chosen_kind:
            axes.scatter([100 * c.score for c, _ in chosen_kind], [100 * r for _, r in chosen_kind], marker=marker,
                         s=60, color=colour, label="baseline (no training)" if kind == "baseline" else "fine-tuned", zorder=3)
    seen: dict[tuple[float, float], int] = {}
    for c, r in points:
        spot = (round(100 * c.score), round(100 * r))
        nudge = seen.get(spot, 0)
        seen[spot] = nudge + 1
        star = " ★" if c.name == chosen else ""
        axes.annotate(f"{c.name}{star}", (100 * c.score, 100 * r), xytext=(6, 4 - 11 * nudge),
                      textcoords="offset points", fontsize=9, fontweight="bold" if star else "normal")
    lowest = min(100 * r for _, r in points)
    axes.set_xlim(0, 105)
    axes.set_ylim(min(lowest - 5, 90), 103)
    axes.set_xlabel(f"task score, % ({next((c.metric for c, _ in points if c.metric), 'score')})  → learned")
    axes.set_ylabel("probe retention, %  → kept")
    axes.set_title("Learned vs forgot (top right is best)")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize=8)
    return _svg(figure)


def plot_loss_curves(candidates: list[CandidateResult]) -> str | None:
    """Training loss per step of every finished trained candidate that logged one."""
    curves = [c for c in candidates if c.kind == "trained" and c.status == "finished" and c.loss_curve]
    if not curves:
        return None
    figure = _figure(6.4, 4.0)
    axes = figure.subplots()
    for c in curves:
        axes.plot([s for s, _ in c.loss_curve], [v for _, v in c.loss_curve], label=c.name, linewidth=1.5)
    axes.set_xlabel("step")
    axes.set_ylabel("train loss")
    axes.set_title("Training loss")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _svg(figure)


def plot_costs(candidates: list[CandidateResult]) -> str | None:
    """Bars per finished trained candidate: trainable % (log scale), artifact MB, train time, peak memory."""
    trained = [c for c in candidates if c.kind == "trained" and c.status == "finished"]
    if not trained:
        return None
    panels = (
        ("trainable parameters, % of all (log)", lambda c: 100 * c.trainable_parameters / c.total_parameters
         if c.trainable_parameters and c.total_parameters else None,
         lambda c: format_param_share(c.trainable_parameters, c.total_parameters), True),
        ("artifact size, MB (log)", lambda c: c.artifact_mb or None, lambda c: format_mb(c.artifact_mb), True),
        ("train time, s", lambda c: c.train_seconds, lambda c: format_seconds(c.train_seconds), False),
        ("peak memory, MB", lambda c: c.peak_memory_mb, lambda c: format_memory(c.peak_memory_mb, c.peak_memory_kind), False),
    )
    figure = _figure(9.0, 1.2 + 0.5 * len(trained) * 2)
    grid = figure.subplots(2, 2)
    names = [c.name for c in trained]
    for axes, (title, value, label, log) in zip(grid.flat, panels):
        values = [value(c) for c in trained]
        known = [v for v in values if v is not None]
        axes.set_title(title, fontsize=10)
        axes.set_yticks(range(len(names)), names)
        axes.invert_yaxis()
        if not known:
            axes.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=axes.transAxes)
            axes.set_xticks([])
            continue
        axes.barh(range(len(names)), [v if v is not None else 0 for v in values], color="#1f77b4")
        if log:
            from matplotlib.ticker import NullLocator

            axes.set_xscale("log")
            axes.xaxis.set_minor_locator(NullLocator())  # minor log ticks triple the drawing time
            axes.set_xlim(min(known) / 3, max(known) * 30)
        else:
            axes.set_xlim(0, max(known) * 1.6 or 1)
        for row, (c, v) in enumerate(zip(trained, values)):
            axes.text(v if v is not None else (axes.get_xlim()[0]), row, " " + label(c), va="center", fontsize=8)
    figure.suptitle("What each method cost")
    return _svg(figure)


# ---------------------------------------------------------------------------------------------------
# Rendering and writing.

_META_LABELS = (("model", "model"), ("task", "task"), ("config", "config"), ("metric", "metric"),
                ("eval_examples", "eval examples"), ("budget", "budget"), ("device", "machine / device"),
                ("date", "date"))

PLOTS = (("learned_vs_forgot", "Learned vs forgot",
          "x: task score on the eval set; y: share of the general-probe items the untuned model got right that the "
          "candidate still gets right. Baselines do not change the model, so they sit at 100%."),
         ("loss_curves", "Training loss", "Train loss per logged step of each fine-tuned candidate."),
         ("costs", "Cost", "Trainable parameters (share of all, log scale), artifact size, training time and peak memory."))


def _meta_rows(meta: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [(label, str(meta[key])) for key, label in _META_LABELS if meta.get(key) not in (None, "")]
    known = {key for key, _ in _META_LABELS}
    rows += [(key.replace("_", " "), v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
             for key, v in meta.items() if key not in known and v not in (None, "")]
    return rows


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def render_markdown(candidates: list[CandidateResult], meta: dict[str, Any], rec: Recommendation,
                    plots: dict[str, str | None]) -> str:
    title = meta.get("title") or f"tunelab compare: {meta.get('task') or meta.get('config') or 'sweep'}"
    lines = [f"# {title}", ""]
    lines += [f"- **{label}**: {_md_cell(value)}" for label, value in _meta_rows({k: v for k, v in meta.items() if k != 'title'})]
    lines += ["", "## Recommendation", "", rec.text, "", "## Results", ""]
    lines.append("| " + " | ".join(header for _, header in COLUMNS) + " |")
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for c in candidates:
        shown = display(c)
        if c.name == rec.choice:
            shown["name"] = f"**{shown['name']}** ★"
        lines.append("| " + " | ".join(_md_cell(shown[key]) for key, _ in COLUMNS) + " |")
    lines += ["", "Scores and retention are percentages of the eval set / probe items; baselines leave the model "
                  "untouched, so they forget nothing. Raw values: `report.json`.", ""]
    for key, heading, caption in PLOTS:
        lines += [f"## {heading}", ""]
        lines += [f"![{heading}]({PLOTS_DIR}/{key}.svg)", "", caption, ""] if plots.get(key) else ["Nothing to plot.", ""]
    failed = [c for c in candidates if c.status != "finished"]
    if failed:
        lines += ["## Failed and skipped", ""] + [f"- **{c.name}** ({c.status}): {_md_cell(c.error or 'no reason recorded')}"
                                                  for c in failed] + [""]
    return "\n".join(lines)


_HTML = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; }
.recommendation { background: #eef6ee; border-left: 4px solid #3a7d3a; padding: 0.8rem 1rem; }
.recommendation.warn { background: #fdf3e6; border-left-color: #c77c11; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85rem; }
th, td { border: 1px solid #ddd; padding: 0.3rem 0.5rem; text-align: left; vertical-align: top; white-space: nowrap; }
td.error { white-space: normal; min-width: 16rem; }
th { background: #f4f4f4; }
tr.chosen td { background: #eef6ee; font-weight: 600; }
tr.failed td, tr.skipped td { color: #888; }
figure { margin: 1rem 0; } figure svg { max-width: 100%; height: auto; }
figcaption { font-size: 0.85rem; color: #555; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<dl class="meta">
{% for label, value in meta_rows %}<dt>{{ label }}</dt><dd>{{ value }}</dd>
{% endfor %}</dl>
<h2>Recommendation</h2>
<p class="recommendation{% if not rec.fine_tune %} warn{% endif %}">{{ rec.text }}</p>
<h2>Results</h2>
<div class="scroll"><table>
<thead><tr>{% for _, header in columns %}<th>{{ header }}</th>{% endfor %}</tr></thead>
<tbody>
{% for c, shown in rows %}<tr class="{{ c.status }}{% if c.name == rec.choice %} chosen{% endif %}">{% for key, _ in columns %}<td{% if key == 'error' %} class="error"{% endif %}>{{ shown[key] }}{% if key == 'name' and c.name == rec.choice %} ★{% endif %}</td>{% endfor %}</tr>
{% endfor %}</tbody>
</table></div>
<p>Scores and retention are percentages of the eval set / probe items; baselines leave the model untouched, so they forget nothing. Raw values are in report.json.</p>
{% for key, heading, caption in plots %}<h2>{{ heading }}</h2>
{% if svgs[key] %}<figure>{{ svgs[key] | safe }}<figcaption>{{ caption }}</figcaption></figure>{% else %}<p>Nothing to plot.</p>{% endif %}
{% endfor %}{% if failed %}<h2>Failed and skipped</h2>
<ul>{% for c in failed %}<li><strong>{{ c.name }}</strong> ({{ c.status }}): {{ c.error or 'no reason recorded' }}</li>{% endfor %}</ul>
{% endif %}</body>
</html>
""")


def render_html(candidates: list[CandidateResult], meta: dict[str, Any], rec: Recommendation,
                plots: dict[str, str | None]) -> str:
    title = meta.get("title") or f"tunelab compare: {meta.get('task') or meta.get('config') or 'sweep'}"
    return _HTML.render(
        title=title, meta_rows=_meta_rows({k: v for k, v in meta.items() if k != "title"}), rec=rec, columns=COLUMNS,
        rows=[(c, display(c)) for c in candidates], plots=PLOTS,
        svgs={key: inline_svg(svg) if svg else None for key, svg in plots.items()},
        failed=[c for c in candidates if c.status != "finished"])


def render_json(candidates: list[CandidateResult], meta: dict[str, Any], rec: Recommendation,
                abs_tol: float, rel_tol: float) -> str:
    report = {
        "meta": meta,
        "recommendation": {"choice": rec.choice, "fine_tune": rec.fine_tune, "text": rec.text,
                           "abs_tol": abs_tol, "rel_tol": rel_tol},
        "candidates": [{**c.to_dict(), "display": display(c)} for c in candidates],
    }
    return json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n"


def write_report(sweep_dir: Path, candidates: list[CandidateResult], meta: dict[str, Any],
                 abs_tol: float = ABS_TOL, rel_tol: float = REL_TOL) -> tuple[Path, Path]:
    """Render and write ``report.md``, ``report.html``, ``report.json`` and ``report-plots/*.svg``.

    Everything is rendered before anything is written, and each file is replaced atomically.

    Args:
        sweep_dir: Where the files go.
        candidates: One record per candidate, in the order the table shows them.
        meta: model, task, config, metric, eval_examples, budget, device, date (any further keys are
            listed too; ``title`` overrides the heading).

    Returns:
        The paths of ``report.md`` and ``report.html``.
    """
    sweep_dir = Path(sweep_dir)
    rec = choose(candidates, abs_tol, rel_tol)
    plots = {"learned_vs_forgot": plot_learned_vs_forgot(candidates, rec.choice),
             "loss_curves": plot_loss_curves(candidates), "costs": plot_costs(candidates)}
    markdown = render_markdown(candidates, meta, rec, plots)
    page = render_html(candidates, meta, rec, plots)
    data = render_json(candidates, meta, rec, abs_tol, rel_tol)
    for key, svg in plots.items():
        if svg:
            write_text_atomic(sweep_dir / PLOTS_DIR / f"{key}.svg", svg)
    write_text_atomic(sweep_dir / "report.json", data)
    write_text_atomic(sweep_dir / "report.md", markdown)
    write_text_atomic(sweep_dir / "report.html", page)
    return sweep_dir / "report.md", sweep_dir / "report.html"
