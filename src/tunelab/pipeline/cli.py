"""``tunelab pipeline PIPELINE.yaml [--dry-run]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunelab.clikit import console, friendly


def register(app: typer.Typer) -> None:
    app.command("pipeline")(friendly(pipeline_command))


def pipeline_command(
    path: Annotated[Path, typer.Argument(help="a pipeline file: output_dir and a list of named stages")],
    dry_run: bool = typer.Option(False, "--dry-run", help="print what would run, skip or resume, and why; run nothing"),
) -> None:
    """Run a multi-stage pipeline: training recipes, merge, export, eval and data stages, each pointing at earlier
    stages by name. A re-run skips the stages whose inputs are unchanged, resumes an interrupted one, and re-runs
    only what is downstream of a change; pipeline_report.md says what each stage learned and forgot."""
    from tunelab.pipeline.runner import run_pipeline
    from tunelab.pipeline.spec import load_pipeline

    run_pipeline(load_pipeline(path), console, dry_run=dry_run)
