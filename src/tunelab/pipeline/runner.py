"""``tunelab pipeline``: run the stages in order, skipping those whose inputs are unchanged.

Each stage is content-addressed: its key is the hash of its inputs (``pipeline.stages.stage_inputs``: its
options or resolved config, the content of the files it reads, the keys of the stages it names), so a
change anywhere upstream changes the keys of everything downstream. ``output_dir/NAME/stage.json`` holds
the key, the inputs and the status. Per stage:

* key unchanged and finished: **skip**;
* key unchanged but the stage did not finish (a kill): **resume** it (a training run from its newest
  checkpoint, a synth stage from its cache of generator replies; the other kinds write their results
  atomically and start again);
* new, or key changed: **run**. The previous result is kept under ``NAME.previous`` until the new one is
  finished, so an interrupted re-run never leaves a stage with nothing; if the inputs are then changed back,
  the previous result is **restore**d instead of re-run.

``pipeline_report.md``, ``.html`` and ``.json`` (in ``output_dir``) say, per stage, what this invocation
did and what the stage's result scored: task score, probe retention, seconds, artifact.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from tunelab.atomic import write_text_atomic
from tunelab.pipeline.spec import PipelineFile, Stage, is_training
from tunelab.pipeline.stages import RESUMABLE, output_of, outputs_of, run_stage, stage_inputs

STAGE_FILE = "stage.json"


@dataclass
class PlannedStage:
    """What will happen to one stage, and why."""

    stage: Stage
    folder: Path
    key: str
    inputs: dict[str, Any]
    action: str  # skip | resume | run
    why: str
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None


def _key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _without_keys(tree: Any) -> str:
    """The inputs' config with each earlier stage's key left out (a re-run parent is reported as such, not as a config change)."""
    return re.sub(r"stage:([^:\"]+):[0-9a-f]+", r"stage:\1", json.dumps(tree, sort_keys=True))


def _changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Which inputs differ, in words."""
    what = [part for part in ("kind", "config") if _without_keys(old.get(part)) != _without_keys(new.get(part))]
    files = [f for f in set(old.get("files", {})) | set(new.get("files", {})) if old.get("files", {}).get(f) != new["files"].get(f)]
    what += [f"file {f}" for f in sorted(files)]
    parents = [p for p, k in new.get("parents", {}).items() if old.get("parents", {}).get(p) != k]
    what += [f"stage {p} re-ran" for p in parents]
    return "changed: " + (", ".join(what) or "inputs")


def _read_record(folder: Path) -> dict[str, Any] | None:
    path = folder / STAGE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _previous(folder: Path) -> Path:
    return folder.with_name(folder.name + ".previous")


def _decide(folder: Path, key: str, inputs: dict[str, Any], stage: Stage) -> tuple[str, str]:
    kept = _read_record(_previous(folder))
    if kept and kept.get("key") == key and kept.get("status") == "finished":  # a re-run was interrupted, then undone
        return "restore", "unchanged (the interrupted re-run is dropped)"
    record = _read_record(folder)
    if record is None:
        return "run", "new"
    if record.get("key") != key:
        return "run", _changes(record.get("inputs", {}), inputs)
    if record.get("status") == "finished" and output_of(stage, folder).exists():
        return "skip", "unchanged"
    return ("resume", "interrupted") if is_training(stage.kind) or stage.kind in RESUMABLE else ("run", "interrupted")


def plan_pipeline(spec: PipelineFile) -> list[PlannedStage]:
    """Every stage's key and action, in order (a stage that runs makes its dependents run: their keys include it)."""
    root = Path(spec.output_dir)
    outputs: dict[str, Path] = {}
    keys: dict[str, str] = {}
    planned = []
    for stage in spec.stages:
        folder = root / stage.name
        inputs = stage_inputs(stage, outputs, keys, folder)
        key = _key(inputs)
        action, why = _decide(folder, key, inputs, stage)
        planned.append(PlannedStage(stage, folder, key, inputs, action, why))
        for name, path in outputs_of(stage, folder).items():
            outputs[name], keys[name] = path, key
    return planned


def _record(item: PlannedStage, status: str, **extra: Any) -> None:
    record = {"name": item.stage.name, "kind": item.stage.kind, "key": item.key, "inputs": item.inputs, "status": status,
              "output": str(output_of(item.stage, item.folder)), **extra}
    write_text_atomic(item.folder / STAGE_FILE, json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def _execute(item: PlannedStage, outputs: dict[str, Path], console: Console) -> None:
    previous = _previous(item.folder)
    if item.action == "restore":
        shutil.rmtree(item.folder, ignore_errors=True)
        previous.rename(item.folder)
        item.summary, item.seconds = (_read_record(item.folder) or {}).get("summary") or {}, 0.0
        return
    if item.action == "run" and item.folder.exists():
        shutil.rmtree(previous, ignore_errors=True)
        item.folder.rename(previous)  # kept until the new result is finished
    item.folder.mkdir(parents=True, exist_ok=True)
    _record(item, "running")
    started = time.time()
    item.summary = run_stage(item.stage, outputs, item.folder, resume=item.action == "resume", console=console)
    item.seconds = round(time.time() - started, 1)
    _record(item, "finished", summary=item.summary, seconds=item.seconds)
    shutil.rmtree(previous, ignore_errors=True)


def run_pipeline(spec: PipelineFile, console: Console, *, dry_run: bool = False) -> list[PlannedStage]:
    """Plan, print the plan, and (unless ``dry_run``) run what it says; returns the planned stages."""
    planned = plan_pipeline(spec)
    print_plan(planned, console)
    if dry_run:
        return planned
    outputs: dict[str, Path] = {}
    for item in planned:
        if item.action == "skip":
            item.summary, item.seconds = (_read_record(item.folder) or {}).get("summary") or {}, 0.0
        else:
            console.rule(f"[bold]{item.stage.name}[/] ({item.stage.kind}): {item.action}, {item.why}")
            _execute(item, outputs, console)
        outputs.update(outputs_of(item.stage, item.folder))
    write_report(Path(spec.output_dir), planned)
    console.print(f"Pipeline report: [bold]{escape(str(Path(spec.output_dir) / 'pipeline_report.md'))}[/]")
    return planned


def print_plan(planned: list[PlannedStage], console: Console) -> None:
    from rich.table import Table

    table = Table(title="Pipeline")
    for column in ("stage", "kind", "action", "why", "key"):
        table.add_column(column)
    for item in planned:
        table.add_row(item.stage.name, item.stage.kind, item.action, item.why, item.key[:10])
    console.print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def write_report(root: Path, planned: list[PlannedStage]) -> None:
    """``pipeline_report.md``, ``.html`` and ``.json``: per stage, what happened now and what its result scored."""
    rows = [{"stage": p.stage.name, "kind": p.stage.kind, "action": p.action, "why": p.why, "key": p.key,
             "seconds": p.seconds, "output": str(output_of(p.stage, p.folder)), **p.summary} for p in planned]
    write_text_atomic(root / "pipeline_report.json", json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    columns = ["stage", "kind", "action", "tuned_score", "probe_retention", "score", "seconds", "train_seconds", "artifact_mb",
               "output"]
    lines = ["# Pipeline report", "", "What each stage learned (`tuned_score`: its task metric after training; `score`: an "
             "eval stage's) and what it forgot (`probe_retention`); `action` is what this invocation did; `seconds` the "
             "stage's wall time (0 when skipped), `train_seconds` a training stage's optimizer steps.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    write_text_atomic(root / "pipeline_report.md", "\n".join(lines) + "\n")
    write_text_atomic(root / "pipeline_report.html", _html(lines[2], columns, rows))


def _html(intro: str, columns: list[str], rows: list[dict[str, Any]]) -> str:
    """The report as one self-contained HTML page (no script, no external resource)."""
    from html import escape

    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(_cell(row.get(c)))}</td>" for c in columns) + "</tr>" for row in rows)
    style = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Pipeline report</title><style>{style}</style></head>"
            f"<body><h1>Pipeline report</h1><p>{escape(intro)}</p><table><tr>{head}</tr>{body}</table></body></html>\n")
