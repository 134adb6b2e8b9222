"""``tunelab merge``: fold a run into its base (and, later, merge several models), verified before it is written."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunelab.clikit import console, friendly


def register(app: typer.Typer) -> None:
    """Add ``merge`` to the ``tunelab`` command."""
    app.command("merge")(friendly(merge_command))


def merge_command(
    run: Annotated[Path, typer.Argument(help="a finished run directory of a mergeable method (lora, ia3, freeze, full)")],
    out: Annotated[Path, typer.Option("--out", help="folder for the merged HF model (safetensors, tokenizer, README.md)")],
    force: bool = typer.Option(False, "--force", help="write it even if the merged model does not reproduce the tuned one"),
    prompts: int = typer.Option(8, min=1, help="held prompts the merge is verified on (the run's eval examples, else the probe)"),
) -> None:
    """Fold a run's trained update into its base: a plain HF model, verified against the tuned model before it is written.

    The check compares merged and unmerged logits (max |Δ logit|) and greedy answers on held prompts; the
    figures go to merge_report.json in the output. Methods that cannot be merged (prompt and prefix tuning,
    Houlsby adapters, QLoRA's 4-bit base) are refused with the reason.
    """
    from tunelab.merging import merge_run

    with console.status("merging and verifying ..."):
        report = merge_run(run, out, force=force, prompts=prompts)
    check = report["verification"]
    agree = check["n_prompts"] - len(check["answers_differ"])
    console.print(f"Merged {run} ({report['method']}) into [bold]{out}[/] in {report['seconds']:.0f} s: max |Δ logit| "
                  f"{check['max_abs_logit_diff']:.2g} (tolerance {check['tolerance']:g}) and {agree} of {check['n_prompts']} "
                  f"greedy answers equal on {check['prompts']}{'; FORCED past a failed check' if report['forced'] else ''}. "
                  f"Report: {Path(out) / 'merge_report.json'}", soft_wrap=True)
