"""The comparison report: one row per candidate, three plots, and a recommendation with its reasons.

The sweep hands over one :class:`~tunelab.compare.results.CandidateResult` per candidate (baselines such as
``zero_shot``, ``few_shot``, ``rag`` and trained methods such as ``lora`` or ``full``); :func:`write_report` renders
them into ``report.md`` (plots as SVG files in ``report-plots/``), a self-contained ``report.html`` (inline
CSS, inline SVG plots, no external URL) and ``report.json`` (the raw records, the strings shown for them
and the recommendation). Every file is rendered in memory first and then written atomically, so a
failure leaves the previous report (or none) in place, never a partial one.

The numbers are formatted in :mod:`tunelab.compare.results`, the recommendation is :mod:`tunelab.compare.choose`'s,
the plots :mod:`tunelab.compare.plots`'; templating is Jinja's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2

from tunelab.atomic import write_text_atomic
from tunelab.compare.choose import ABS_TOL, REL_TOL, Recommendation, choose
from tunelab.compare.plots import inline_svg, plot_costs, plot_learned_vs_forgot, plot_loss_curves
from tunelab.compare.results import COLUMNS, CandidateResult, display

PLOTS_DIR = "report-plots"


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
