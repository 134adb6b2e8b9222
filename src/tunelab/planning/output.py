"""Rendering a plan with rich: memory by component, the verdict, time, the GPU catalog, suggestions."""

from __future__ import annotations

from rich.markup import escape

from tunelab.planning.devices import GPUS, GiB
from tunelab.planning.planner import Plan

_WHAT = {
    "weights": "base model", "trainable_weights": "added by the method", "gradients": "of trained parameters",
    "optimizer_states": "AdamW: 2 per trained parameter", "activations": "kept for backward",
    "weight_copies": "autocast copies of float32 weights", "logits": "logits, float32 log-softmax, gradients",
    "attention_mask": "4-D mask of padded/packed rows", "workspace": "gradient buffers / optimizer temporaries",
    "overhead": "runtime (assumed)",
}


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}" if n >= 0.005 * GiB else f"{n / 2**20:.1f} MiB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _checkpointing(plan: Plan) -> str:
    if not plan.checkpointed_blocks:
        return ""
    if plan.checkpointed_blocks == plan.shape.layers:
        return ", gradient checkpointing"
    return f", gradient checkpointing in {plan.checkpointed_blocks} of {plan.shape.layers} blocks"


def print_plan(plan: Plan, console) -> None:
    """Render a plan with rich: memory by component, verdict, time, the GPU catalog, suggestions, assumptions."""
    from rich.table import Table

    mem, dev, t = plan.memory, plan.device, plan.time
    console.print(f"[bold]{plan.method}[/] on {plan.model}: {plan.trainable_params:,} trainable of {plan.total_params:,} "
                  f"parameters; {plan.precision}, {plan.weight_bytes} B per weight, "
                  f"micro-batch {plan.batch[0]} x {plan.batch[1]}{_checkpointing(plan)}")
    if plan.active_params is not None:
        shape = plan.shape
        console.print(f"mixture of experts: {plan.active_params:,} parameters active per token of {plan.total_params:,} "
                      f"({shape.active_experts} of {shape.experts} experts per block)")
    for line in plan.vision_notes or []:
        console.print(escape(line))
    table = Table(title=f"Peak memory (during the {mem.peak_phase})")
    for column, justify in (("component", "left"), ("GiB", "right"), ("what", "left")):
        table.add_column(column, justify=justify)
    for name, value in mem.components().items():
        if value:
            table.add_row(name.replace("_", " "), _gib(value), _WHAT[name])
    table.add_row("[bold]total[/]", f"[bold]{_gib(mem.total)}[/]", f"tensors {_gib(mem.tensors)} GiB + overhead")
    console.print(table)
    console.print("tensors by phase (GiB): " + ", ".join(f"{k} {_gib(v)}" for k, v in mem.phases.items()))
    verdict = "[red]does not fit[/]" if not plan.fits else "[yellow]fits, tight[/]" if plan.tight else "[green]fits[/]"
    spare = (dev.memory_bytes - mem.total) / GiB
    console.print(f"{dev.name} ({dev.memory_bytes / GiB:.1f} GiB): {verdict}, {spare:+.1f} GiB to spare")
    steps = f" for {t.steps} steps" if t.steps else ""
    console.print(f"time: ~{_duration(t.seconds)}{steps}" + (f", {t.total_tokens:,.0f} tokens" if t.total_tokens else ""))
    gpus = Table(title="Other GPUs")
    for column in ("gpu", "GiB", "fits", "time"):
        gpus.add_column(column)
    for name, g in GPUS.items():
        fits = "yes" if plan.fits_by_gpu[name] else "no"
        gpus.add_row(name, f"{g.memory_bytes / GiB:.0f}", fits, _duration(plan.time_by_gpu[name]))
    console.print(gpus)
    if plan.suggestions:
        console.print("[bold]To make it fit[/] (cumulative):")
        for line in plan.suggestions:
            console.print(f"  {escape(line)}")
    console.print("[dim]Assumptions:[/]")
    for line in plan.assumptions:
        console.print(f"[dim]  - {escape(line)}[/]")
