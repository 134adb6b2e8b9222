"""Pipeline and compare reports under the dashboard's folders: found, listed, shown (read-only, no torch).

A pipeline folder holds ``pipeline_report.json`` (one row per stage); a compare sweep holds ``report.json``
with ``candidates`` and a ``report-plots/`` folder of SVGs, shown as images (an SVG in ``<img>`` runs no script).
Ids are paths relative to a root, as for runs (``ui.runs.Roots``); a report file or plot linked outside the roots is
not read (``Roots.readable``).
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tunelab.ui import runs as R
from tunelab.ui.pages import page

PIPELINE, COMPARE = "pipeline_report.json", "report.json"
STAGE_COLUMNS = ("stage", "kind", "action", "why", "tuned_score", "probe_retention", "score", "seconds", "output")
CANDIDATE_COLUMNS = ("name", "kind", "status", "score", "retention", "probe", "probe_lost", "trainable", "artifact_mb",
                     "train_seconds")


def _kind(roots: R.Roots, folder: Path) -> str | None:
    if roots.readable(folder / PIPELINE):
        return "pipeline"
    if roots.readable(folder / COMPARE) and (folder / "sweep.yaml").is_file():
        return "compare"
    return None


def find_reports(roots: R.Roots) -> list[tuple[str, Path]]:
    """(kind, folder) of every pipeline and compare sweep under the roots (links not followed)."""
    return [(kind, folder) for folder in R.folders(roots) if (kind := _kind(roots, folder))]


def resolve(roots: R.Roots, report_id: str) -> Path | None:
    """The report folder ``report_id`` names inside the roots, or None."""
    path = roots.folder(report_id)
    return path if path is not None and _kind(roots, path) else None


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "–" if value is None else escape(str(value))


def list_page(roots: R.Roots) -> str:
    rows = "".join(f"<tr class=\"report\"><td>{kind}</td><td><a href=\"/report/{quote(roots.run_id(folder))}\">"
                   f"{escape(roots.run_id(folder)[2:] or folder.name)}</a></td></tr>" for kind, folder in find_reports(roots))
    empty = "" if rows else "<p>No pipeline (pipeline_report.json) or compare sweep (report.json) under the folders.</p>"
    return page("Reports", f"<h1>Pipelines and comparisons</h1><table id=\"reports\"><tr><th>kind</th><th>folder</th></tr>"
                           f"{rows}</table>{empty}")


def report_page(roots: R.Roots, report_id: str, folder: Path) -> str:
    if _kind(roots, folder) == "pipeline":
        stages = json.loads((folder / PIPELINE).read_text(encoding="utf-8"))
        head = "".join(f"<th>{c}</th>" for c in STAGE_COLUMNS)
        body = "".join("<tr class=\"stage\">" + "".join(f"<td>{_cell(s.get(c))}</td>" for c in STAGE_COLUMNS) + "</tr>" for s in stages)
        return page(folder.name, f"<h1>Pipeline {escape(folder.name)}</h1><p>What each stage learned and what it forgot; "
                                 f"<code>action</code> is what its last invocation did.</p><table id=\"stages\"><tr>{head}</tr>{body}</table>")
    report = json.loads((folder / COMPARE).read_text(encoding="utf-8"))
    head = "".join(f"<th>{c}</th>" for c in CANDIDATE_COLUMNS)
    body = "".join("<tr class=\"candidate\">" + "".join(f"<td>{_cell((c.get('display') or {}).get(k))}</td>" for k in CANDIDATE_COLUMNS)
                   + "</tr>" for c in report.get("candidates", []))
    plots = "".join(f"<figure><img src=\"/file/{quote(report_id)}/report-plots/{quote(p.name)}\" alt=\"{escape(p.stem)}\">"
                    f"<figcaption>{escape(p.stem.replace('_', ' '))}</figcaption></figure>"
                    for p in _plots(roots, folder))
    verdict = escape((report.get("recommendation") or {}).get("text") or "")
    return page(folder.name, f"<h1>Compare {escape(folder.name)}</h1><p class=\"verdict\">{verdict}</p>"
                             f"<table id=\"candidates\"><tr>{head}</tr>{body}</table>{plots}")


def _plots(roots: R.Roots, folder: Path) -> list[Path]:
    """The sweep's ``report-plots/*.svg`` that lie inside the roots (none when the folder links outside)."""
    plots = folder / "report-plots"
    if not plots.is_dir() or not roots.holds(plots):
        return []
    return sorted(p for p in plots.glob("*.svg") if roots.readable(p))


def plot_file(roots: R.Roots, report_id: str, name: str) -> Path | None:
    """A compare sweep's plot (``report-plots/*.svg``), or None."""
    folder = resolve(roots, report_id)
    if folder is None or "/" in name or not name.endswith(".svg"):
        return None
    path = folder / "report-plots" / name
    return path if roots.readable(path) and path.resolve().parent == (folder / "report-plots").resolve() else None
