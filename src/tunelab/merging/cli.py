"""``tunelab merge``: fold a run into its base, merge several models (``MERGE.yaml``), or blend a run with its
base (``--interpolate``); every result is verified before it is written."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from tunelab.clikit import console, friendly
from tunelab.errors import TunelabError


def register(app: typer.Typer) -> None:
    """Add ``merge`` to the ``tunelab`` command."""
    app.command("merge")(friendly(merge_command))


def merge_command(
    target: Annotated[Path, typer.Argument(metavar="RUN_DIR|MERGE.yaml", help="a finished run directory of a mergeable method "
                                           "(lora, ia3, freeze, full), or a merge file: merge: {method, base, models, lambda, seed}")],
    out: Annotated[Path, typer.Option("--out", help="folder for the merged HF model (safetensors, tokenizer, README.md)")],
    force: bool = typer.Option(False, "--force", help="write it even if the merged model does not reproduce the one checked against"),
    prompts: int = typer.Option(8, min=1, help="held prompts the merge is verified on (the run's eval examples, else the probe)"),
    interpolate: str | None = typer.Option(None, "--interpolate", metavar="T,T,...", help="score the blends base + t·(tuned − base) "
                                           "of RUN_DIR on its eval data and probe, e.g. 0.25,0.5,0.75,1.0, and write the picked one"),
    pick: str | None = typer.Option(None, "--pick", help="with --interpolate: best-task (default), best-retention, or one of the t"),
    min_retention: float | None = typer.Option(None, "--min-retention", min=0.0, max=1.0,
                                               help="with --interpolate: the best task score among blends keeping this probe retention"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="with MERGE.yaml or --interpolate: score on the first N eval "
                                     "examples of each task and N probe items only (quicker, rougher; recorded in the report)"),
) -> None:
    """Fold a run's update into its base, merge several models, or blend a run with its base: a plain HF model, verified.

    RUN_DIR: the folded model is compared with the tuned one (max |Δ logit|, greedy answers on held prompts).
    MERGE.yaml: the models (run directories are folded first) are merged with linear, task_arithmetic, ties,
    dare_linear or dare_ties; the base, each model and the merge are scored on each run's eval data. With
    --interpolate: one table of task score and probe retention per t. Figures go to merge_report.json.
    """
    from tunelab.merging.spec import is_merge_file

    if (pick is not None or min_retention is not None) and interpolate is None:
        raise TunelabError("--pick and --min-retention choose among blends: give --interpolate T,T,... too")
    if is_merge_file(target):
        if interpolate is not None:
            raise TunelabError(f"--interpolate blends one run with its base; give a run directory, not {target}")
        _merge_many(target, out, force, prompts, limit)
    elif interpolate is not None:
        _interpolate(target, out, interpolate, pick, min_retention, force, prompts, limit)
    elif limit is not None:
        raise TunelabError("--limit applies to scoring merges of a MERGE.yaml and --interpolate blends; a fold is checked, not scored")
    else:
        _fold(target, out, force, prompts)


def _fold(run: Path, out: Path, force: bool, prompts: int) -> None:
    from tunelab.merging import merge_run

    with console.status("merging and verifying ..."):
        report = merge_run(run, out, force=force, prompts=prompts)
    check = report["verification"]
    agree = check["n_prompts"] - len(check["answers_differ"])
    console.print(f"Merged {escape(str(run))} ({report['method']}) into [bold]{escape(str(out))}[/] in {report['seconds']:.0f} s: max |Δ logit| "
                  f"{check['max_abs_logit_diff']:.2g} (tolerance {check['tolerance']:g}) and {agree} of {check['n_prompts']} "
                  f"greedy answers equal on {check['prompts']}{'; FORCED past a failed check' if report['forced'] else ''}. "
                  f"Report: {escape(str(Path(out) / 'merge_report.json'))}", soft_wrap=True)


def _checked(report: dict[str, Any], out: Path) -> str:
    check = report["verification"]
    return (f"written to [bold]{escape(str(out))}[/] in {report['seconds']:.0f} s; as reloaded from disk: max |Δ logit| "
            f"{check['max_abs_logit_diff']:.2g}, {check['answers_agree']} of {check['n_prompts']} greedy answers equal"
            f"{'; FORCED past a failed check' if report['forced'] else ''}. Report: {escape(str(out / 'merge_report.json'))}")


def _say(message: str) -> None:
    console.print(f"[dim]{escape(message)}[/]", soft_wrap=True)  # progress lines stay: scoring takes minutes, the figures matter


def _merge_many(path: Path, out: Path, force: bool, prompts: int, limit: int | None) -> None:
    from rich.table import Table

    from tunelab.merging.many import merge_models
    from tunelab.merging.spec import load_merge_spec

    spec = load_merge_spec(path)
    report = merge_models(spec, out, force=force, prompts=prompts, limit=limit, say=_say)
    table = Table(title=f"{report['method']} merge: each run's task (its metric) and probe retention against the base")
    table.add_column("model")
    for task in report["tasks"]:
        table.add_column(escape(f"{task['name']} ({task['metric']})"), justify="right")
    table.add_column("probe retention", justify="right")
    for row in report["scores"]:
        probe = row["probe"]
        table.add_row(escape(str(row["model"])), *(f"{row['tasks'][t['name']]['score']:.3f}" for t in report["tasks"]),
                      _pct(probe["retention"]) if probe else "–", style="bold" if row["role"] == "merge" else None)
    console.print(table)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(str(warning))}", soft_wrap=True)
    console.print("Merge " + _checked(report, out), soft_wrap=True)


def _interpolate(run: Path, out: Path, blends: str, pick: str | None, min_retention: float | None, force: bool,
                 prompts: int, limit: int | None) -> None:
    from rich.table import Table

    from tunelab.merging.card import interpolation_table
    from tunelab.merging.interpolate import interpolate_run, parse_blends

    ts = parse_blends(blends)
    report = interpolate_run(run, ts, out, pick=pick, min_retention=min_retention, force=force, prompts=prompts,
                             limit=limit, say=_say)
    table = Table(title=f"Blends base + t·(tuned − base) of {escape(str(run))}: {report['metric'] or 'no task'} on {report['examples']} "
                        f"eval examples, probe of {report['probe_items']} items")
    for name in ("t", "task score", "probe right", "probe retention"):
        table.add_column(name, justify="right")
    for cells in interpolation_table(report):
        table.add_row(*cells, style="bold" if "picked" in cells[0] else None)
    console.print(table)
    console.print(f"Blend t={report['picked_t']:g} ({report['pick']}) " + _checked(report, out), soft_wrap=True)


def _pct(value: float | None) -> str:
    return "n/a (base answered none)" if value is None else f"{value:.0%}"
