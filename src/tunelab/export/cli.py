"""``tunelab export``: write a run or model as HF or GGUF, verified with the runtime that will run it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from tunelab.clikit import console, friendly


def register(app: typer.Typer) -> None:
    """Add ``export`` to the ``tunelab`` command."""
    app.command("export")(friendly(export_command))


def export_command(
    source: Annotated[Path, typer.Argument(help="a finished run directory (merged first) or a Hugging Face model directory")],
    format: Annotated[str, typer.Option("--format", help="hf | gguf | gguf-lora (a run's LoRA adapter for llama.cpp --lora)")] = "gguf",
    quant: Annotated[str, typer.Option("--quant", help="f16 | bf16 | q8_0 | q6_K | q5_K_M | q4_K_M | q4_0 (GGUF formats; llama.cpp's quantizer)")] = "f16",
    out: Annotated[Optional[Path], typer.Option("--out", help="output folder (default: beside the source); a path ending in .gguf is the GGUF file alone")] = None,
    force: bool = typer.Option(False, "--force", help="publish even if the llama.cpp check fails (recorded in the report)"),
    prompts: int = typer.Option(8, min=1, help="held prompts to check on (the run's eval examples, else the probe)"),
    new_tokens: Optional[int] = typer.Option(None, min=1, help="greedy tokens generated per held prompt (default: the "
                                             "run's eval.max_new_tokens on its eval examples, else 32)"),
) -> None:
    """Export a run or model: GGUF (with an Ollama Modelfile) or HF, checked against the HF model before it is written.

    The GGUF is loaded in llama.cpp (llama-cpp-python) and compared on held prompts: prompt token ids, chat
    template rendering, greedy answers and perplexity; the figures go to export_report.json in the output.
    """
    from tunelab.export import export_model

    with console.status(f"exporting {escape(str(source))} as {escape(format)} ..."):
        report = export_model(source, format, quant, out, force=force, prompts=prompts, new_tokens=new_tokens)
    check = report.get("verification") or {}
    if check.get("checked"):
        task = check.get("task") or {}
        score = f", task {task['metric']} {task['hf']:.1%} → {task['gguf']:.1%}" if "hf" in task else ""
        console.print(f"Exported {escape(str(source))} to [bold]{escape(report['output'])}[/] ({escape(str(report.get('file')))}, {report['seconds']:.0f} s): "
                      f"greedy agreement {check['greedy_agreement']:.0%} on {check['n_prompts']} prompts, perplexity "
                      f"{check['perplexity_increase']:+.2%}{score}{'; FORCED past a failed check' if check['forced'] else ''}. "
                      f"Report: {escape(str(Path(report['output']) / 'export_report.json'))}", soft_wrap=True)
    else:
        console.print(f"Exported {escape(str(source))} to [bold]{escape(report['output'])}[/] in {report['seconds']:.0f} s "
                      f"{'(NOT checked in llama.cpp)' if check else ''}", soft_wrap=True)
