"""``tunelab demo``: the main job on the embedded default model, end to end, in minutes on a CPU.

The task is text-to-SQL over a small shop database of the project's own making
(``tunelab.examples.sql``): 240 training questions, 40 held-out questions whose values (categories,
cities, customers, numbers) never appear in training. One ``tunelab train`` run evaluates the untuned
SmolLM2-135M-Instruct (zero-shot and 2-shot) by SQLite execution accuracy, runs the forgetting probe,
trains LoRA, and evaluates again.
"""

from __future__ import annotations

import json
import time
from importlib.resources import files
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from tunelab.resolve import load_config
from tunelab.models.embedded import cache_root
from tunelab.recipes import sft


def run_demo(output_root: str = "runs", console: Console | None = None, overrides: list[str] = ()) -> Path:
    """Run the demo; returns the run directory (its eval.json holds every prediction). ``overrides`` (``KEY=VALUE``)
    apply on top of the demo's settings, as ``tunelab train``'s do."""
    from tunelab.examples.sql.task import build_database

    console = console or Console(stderr=True)
    started = time.time()
    data_dir = files("tunelab.examples") / "sql"
    database = build_database(cache_root() / "demo" / "shop.sqlite")
    run_dir = Path(output_root) / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    config = load_config(None, [
        "model=smollm2-135m-instruct", "method.name=lora", "method.r=16", "method.alpha=32",
        f"data.train={data_dir / 'train.jsonl'}", f"data.eval={data_dir / 'test.jsonl'}", "data.max_length=256",
        "eval.metric=sql_exec", f"eval.db={database}", "eval.max_new_tokens=40", "eval.few_shot=2", "eval.batch_size=64",
        "train.defaults=fixed", "train.epochs=1", "train.batch_size=8", "train.lr=1e-3", "train.warmup_ratio=0.1", f"output_dir={run_dir}",
        *overrides,
    ])
    result = sft.main(config, console=console)
    report = json.loads((result.run_dir / "eval.json").read_text())
    _print_summary(report, result, time.time() - started)
    return result.run_dir


def _print_summary(report: dict, result, seconds: float) -> None:
    """Timings and two example answers; the before/after table was printed by the run itself."""
    out = Console()
    base, tuned = report["baselines"]["zero_shot"], report["tuned"]
    out.print(f"[bold]Execution accuracy on {tuned['n']} unseen questions: {base['score']:.0%} untuned → "
              f"{tuned['score']:.0%} after LoRA[/] (training {result.train_seconds:.0f} s, whole demo {seconds:.0f} s).")
    for before, after in list(zip(base["examples"], tuned["examples"]))[:2]:
        out.print(f"[dim]Q:[/] {escape(before['prompt'])}\n  untuned: {escape(repr(before['prediction'][:90]))}\n  tuned:   {escape(repr(after['prediction']))}")
    out.print(f"Run directory: {result.run_dir} (eval.json holds every prediction; adapter/ loads with plain peft)")
