"""The dashboard's HTML, rendered on the server from :mod:`tunelab.ui.runs` (every value escaped).

No template engine and no front-end build: pages are short, and the few interactive parts (curves that
update while a run trains, the "changed only" filter) are one small script, ``static/app.js``.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any
from urllib.parse import quote

import yaml

from tunelab.runs import Run
from tunelab.ui import runs as R


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "–"
    if kind == "pct":
        return f"{100 * value:.1f} %"
    if isinstance(value, float):
        return f"{value:.3f}" if kind != "s" else f"{value:.0f} s"
    return escape(str(value))


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)} · tunelab</title>"
            "<link rel=\"stylesheet\" href=\"/static/style.css\"></head><body><header><a href=\"/\">tunelab</a> "
            "<a href=\"/reports\">reports</a> <a href=\"/data\">data</a> <a href=\"/launch\">launch</a> <a href=\"/chat\">chat</a> "
            f"<span>{escape(title)}</span></header><main>{body}</main><script src=\"/static/app.js\"></script></body></html>")


COLUMNS = (("name", "run", ""), ("status", "status", ""), ("recipe", "recipe", ""), ("method", "method", ""),
           ("model", "model", ""), ("untuned", "untuned", ""), ("tuned", "tuned", ""), ("retention", "probe retention", "pct"),
           ("seconds", "train time", "s"), ("artifact_mb", "artifact MB", ""))


def runs_page(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th data-sort=\"{key}\">{escape(label)}</th>" for key, label, _ in COLUMNS)
    body = []
    for row in rows:
        cells = []
        for key, _, kind in COLUMNS:
            text = _fmt(row.get(key), kind)
            if key == "name":
                text = f"<a href=\"/run/{quote(row['id'])}\">{text}</a>"
            elif key == "status":
                text = f"<span class=\"status {escape(str(row['status']))}\">{text}</span>"
            cells.append(f"<td data-value=\"{escape(str(row.get(key) if row.get(key) is not None else ''))}\">{text}</td>")
        body.append(f"<tr class=\"run\" data-status=\"{escape(str(row['status']))}\">{''.join(cells)}</tr>")
    filters = ("<p class=\"filters\"><input id=\"filter\" placeholder=\"filter runs\" aria-label=\"filter runs\"> "
               f"<span id=\"count\">{len(rows)} runs</span></p>")
    empty = "" if rows else "<p>No run directory (a folder holding manifest.json) under the roots.</p>"
    return page("Runs", f"<h1>Runs</h1>{filters}<table id=\"runs\"><thead><tr>{head}</tr></thead>"
                        f"<tbody>{''.join(body)}</tbody></table>{empty}")


def _facts(row: dict[str, Any], run: Run) -> str:
    m = run.record
    facts = [("status", row["status"]), ("recipe", row["recipe"]), ("method", row["method"]), ("model", row["model"]),
             ("steps", m.steps_done), ("train time", _fmt(m.train_seconds, "s")),
             ("tokens/s", _fmt(m.tokens_per_s)), ("peak memory MB", m.peak_memory_mb),
             ("untuned → tuned", f"{_fmt(row['untuned'])} → {_fmt(row['tuned'])}"), ("probe retention", _fmt(row["retention"], "pct"))]
    if row.get("parent"):
        facts.append(("parent", row["parent"]))
    return "<table class=\"facts\">" + "".join(f"<tr><th>{escape(k)}</th><td>{v if k in ('train time', 'untuned → tuned', 'probe retention', 'tokens/s') else _fmt(v)}</td></tr>"
                                              for k, v in facts) + "</table>"


def _predictions(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>No evaluation yet.</p>"
    mark = {True: "<span class=\"right\">✓</span>", False: "<span class=\"wrong\">✗</span>", None: ""}
    body = "".join(
        f"<tr class=\"prediction{' changed' if r['untuned_right'] is not None and r['untuned_right'] != r['tuned_right'] else ''}\">"
        f"<td>{_fmt(r['prompt'])}</td><td>{mark[r['untuned_right']]} {_fmt(r['untuned'])}</td>"
        f"<td>{mark[r['tuned_right']]} {_fmt(r['tuned'])}</td><td>{_fmt(r['reference'])}</td></tr>" for r in rows)
    return ("<p><label><input type=\"checkbox\" id=\"changed-only\"> only the examples whose right/wrong changed</label></p>"
            "<table id=\"predictions\"><thead><tr><th>prompt</th><th>untuned</th><th>tuned</th><th>reference</th></tr></thead>"
            f"<tbody>{body}</tbody></table>")


def _probe(changes: dict) -> str:
    parts = []
    if changes.get("items"):
        parts.append(f"<p id=\"probe-counts\">{changes['items']} items: the untuned model answered {changes['right_before']}, "
                     f"the tuned model {changes['right_after']}; retention {_fmt(changes['retention'], 'pct')} of the "
                     f"{changes['right_before']} the untuned model knew.</p>")
    for what in ("lost", "gained"):
        items = "".join(f"<li><b>{_fmt(i.get('question'))}</b> {_fmt(i.get('after') or i.get('answer'))}</li>" if isinstance(i, dict)
                        else f"<li>{_fmt(i)}</li>" for i in changes[what])  # older runs list the item ids only
        parts.append(f"<h3>{what} ({len(changes[what])})</h3><ul class=\"probe-{what}\">{items}</ul>")
    return "".join(parts)


def run_page(run: Run, run_id: str) -> str:
    row = R.summary(run, run_id)
    live = "true" if row["status"] == "running" else "false"
    curves = (f"<div id=\"curves\" data-run=\"{escape(run_id)}\" data-live=\"{live}\"><select id=\"series\" aria-label=\"series\">"
              "</select><svg id=\"chart\" viewBox=\"0 0 640 240\" role=\"img\" aria-label=\"training curve\"></svg></div>")
    files = "".join(f"<tr><td>{escape(name)}</td><td>{'–' if mb is None else f'{mb:.2f}'}</td></tr>" for name, mb in R.artifacts(run))
    config = escape(yaml.safe_dump(run.config, sort_keys=False)) if run.config else "(no config.yaml)"
    body = (f"<h1>{escape(row['name'])}</h1>{_facts(row, run)}<h2>Curves</h2>{curves}"
            f"<h2>Predictions</h2>{_predictions(R.predictions(run))}<h2>Forgetting probe</h2>{_probe(R.probe_changes(run))}"
            f"<h2>Files</h2><table><tr><th>name</th><th>MB</th></tr>{files}</table>"
            f"<h2>Config</h2><pre>{config}</pre><h2>Manifest</h2><pre>{escape(json.dumps(run.manifest, indent=2))}</pre>")
    return page(row["name"], body)
