"""The comparison's three plots (learned vs forgot, loss curves, costs) as SVG text.

Plotting is matplotlib's object-oriented ``Figure`` API, no pyplot, so no GUI backend is ever touched; the SVG is
deterministic (fixed hash salt, no date) and keeps text as text, so candidate names stay searchable.
"""

from __future__ import annotations

import io
import re

from tunelab.compare.results import CandidateResult, format_mb, format_memory, format_param_share, format_seconds


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
