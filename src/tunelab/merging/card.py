"""The model card (``README.md``) of a merged model: where it came from and what it was measured to do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.evaluation.summary import eval_summary


def headline(run: Any) -> dict[str, Any]:
    """The run's evaluation headline numbers: from ``eval.json`` where it has one, else its manifest's summary."""
    results = run.eval_results()
    if results:
        return eval_summary(results)
    return dict(run.record.eval_summary or {})


def _rows(pairs: list[tuple[str, Any]]) -> str:
    return "\n".join(f"| {k} | {v} |" for k, v in pairs if v is not None)


def model_card(run: Any, report: dict[str, Any]) -> str:
    """Markdown describing the merged model: base, method, the run's hashes, evaluation and the fold's check."""
    manifest = run.record
    provenance = [("base model", f"`{run.base_model}`"), ("method", f"`{run.method_name}`"),
                  ("method options", f"`{json.dumps(run.method_options(), sort_keys=True)}`"),
                  ("run directory", f"`{run.path}`"), ("config hash", manifest.config_hash),
                  ("data hash", manifest.data_hash), ("code hash", manifest.code_hash),
                  ("git commit", manifest.git_commit), ("tunelab", manifest.tunelab_version),
                  ("data files", ", ".join(f"`{f}`" for f in manifest.data_files or []) or None)]
    scores = [(k, round(v, 4) if isinstance(v, float) else v) for k, v in headline(run).items()]
    check = report["verification"]
    verification = [("held prompts", f"{check['n_prompts']} from {check['prompts']} ({check['prompt_tokens']} tokens)"),
                    ("max abs logit difference", f"{check['max_abs_logit_diff']:.3g} (tolerance {check['tolerance']:g})"),
                    ("greedy answers agreeing", f"{check['answers_agree']} of {check['n_prompts']} ({check['new_tokens']} new tokens)"),
                    ("passed", "yes" if check["passed"] else "**no: published with --force**")]
    parts = [
        f"# {run.path.name} (merged)\n",
        f"`{run.base_model}` with the `{run.method_name}` update of the tunelab run `{run.path}` folded into its "
        f"weights: a plain transformers model (`AutoModelForCausalLM.from_pretrained`), dtype {report['dtype']}, with "
        "the tokenizer and chat template used in training.\n",
        "## Provenance\n\n| | |\n|---|---|\n" + _rows(provenance) + "\n",
        "## Evaluation of the run (before merging)\n\n" + (("| | |\n|---|---|\n" + _rows(scores)) if scores else "The run recorded no evaluation.") + "\n",
        "## Merge check (merged against unmerged)\n\n| | |\n|---|---|\n" + _rows(verification) + "\n",
    ]
    return "\n".join(parts)


def _check_rows(check: dict[str, Any]) -> str:
    rows = [("held prompts", f"{check['n_prompts']} from {check['prompts']} ({check['prompt_tokens']} tokens)"),
            ("max abs logit difference", f"{check['max_abs_logit_diff']:.3g} (tolerance {check['tolerance']:g})"),
            ("greedy answers agreeing", f"{check['answers_agree']} of {check['n_prompts']} ({check['new_tokens']} new tokens)"),
            ("passed", "yes" if check["passed"] else "**no: published with --force**")]
    return "## Check (the model as written against the one scored)\n\n| | |\n|---|---|\n" + _rows(rows) + "\n"


def _pct(value: Any) -> str:
    return "–" if value is None else f"{value:.1%}"


def _limited(report: dict[str, Any]) -> str:
    limit = report.get("limit")
    return f"Scored on the first {limit} eval examples of each task and {limit} probe items only (`--limit`).\n\n" if limit else ""


def merge_card(report: dict[str, Any]) -> str:
    """Markdown for a merge of several models: rule, inputs, every model's score on every run's task, the check."""
    inputs = "\n".join(f"| `{m['path']}` | {m['weight']:g} | {'' if m['density'] is None else format(m['density'], 'g')} | "
                       f"{m['run_method'] or 'model'} | {m['config_hash'] or ''} |" for m in report["models"])
    tasks = report["tasks"]
    header = "| model | " + " | ".join(f"{t['name']} ({t['metric']}, {t['examples']})" for t in tasks) + " | probe retention |"
    lines = [header, "|---" * (len(tasks) + 2) + "|"]
    for row in report["scores"]:
        probe = row["probe"]
        cells = [_pct(row["tasks"][t["name"]]["score"]) for t in tasks]
        name = f"**{row['model']}**" if row["role"] == "merge" else row["model"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_pct(probe['retention']) if probe else '–'} |")
    parts = [
        f"# Merge: {report['method']} of {len(report['models'])} models\n",
        f"{report['rule']}\n\nBase `{report['base']}`, lambda {report['lambda']:g}, seed {report['seed']}; a plain transformers "
        f"model (`AutoModelForCausalLM.from_pretrained`), dtype {report['dtype']}, with the tokenizer and chat template the "
        "models share. Runs were folded into full weights first.\n",
        "## Models\n\n| path | weight | density | method | config hash |\n|---|---|---|---|---|\n" + inputs + "\n",
        "## Scores (each run's task with its own evaluation settings; probe retention against the base)\n\n" + _limited(report)
        + "\n".join(lines) + "\n",
        _check_rows(report["verification"]),
    ]
    if report["warnings"]:
        parts.append("## Warnings\n\n" + "\n".join(f"- {w}" for w in report["warnings"]) + "\n")
    return "\n".join(parts)


def interpolation_table(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(t, task score, probe right, retention) per blend, the picked one marked, for the card and the console."""
    out = []
    for row in report["table"]:
        right = "–" if row["probe_right"] is None else f"{row['probe_right']} of {row['probe_items']}"
        mark = " (picked)" if row["t"] == report["picked_t"] else " (base)" if row.get("reference") else ""
        out.append((f"{row['t']:g}{mark}", _pct(row["task_score"]), right, _pct(row["retention"])))
    return out


def blend_card(report: dict[str, Any]) -> str:
    """Markdown for a blend base + t (tuned - base) of a run: the table of every t scored and the check."""
    table = "\n".join(f"| {t} | {s} | {r} | {k} |" for t, s, r, k in interpolation_table(report))
    recorded = [(k, round(v, 4) if isinstance(v, float) else v) for k, v in report["run_eval"].items()]
    parts = [
        f"# {Path(report['run']).name}, blend t = {report['picked_t']:g}\n",
        f"`{report['base_model']}` + {report['picked_t']:g} × (the `{report['method']}` run `{report['run']}` folded − base): "
        f"a plain transformers model, dtype {report['dtype']}, with the training tokenizer and chat template. Picked by "
        f"{report['pick']}" + (f" with probe retention ≥ {report['min_retention']:g}" if report["min_retention"] is not None else "") + ".\n",
        f"## Blends ({report['metric'] or 'no task'} on {report['examples']} eval examples; probe of {report['probe_items']} items)\n\n"
        + _limited(report) + "| t | task score | probe right | probe retention |\n|---|---|---|---|\n" + table + "\n",
        "## The run's own evaluation\n\n" + (("| | |\n|---|---|\n" + _rows(recorded)) if recorded else "none recorded") + "\n",
        _check_rows(report["verification"]),
    ]
    return "\n".join(parts)
