"""One step reporter for every recipe: metrics.jsonl, TensorBoard, the progress bar, plain log lines and tokens/s.

A recipe calls :meth:`StepReporter.step` after each optimizer step; only on logged steps is anything read
back from the device (the loss, the gradient norm, the recipe's extra stats such as rewards, margins or
KL), so un-logged GPU steps never wait for the host. Extra stats are logged as their mean per unit of
loss (``stats[k] / count``); what a recipe reduced itself goes in ``reduced`` and is logged as it is.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tunelab.training import distributed
from tunelab.training.metrics import MetricsLog
from tunelab.training.optim import StepOutcome, require_finite
from tunelab.training.plan import StepPlan


class StepReporter:
    """Context manager around a training loop; see the module docstring."""

    def __init__(self, run_dir: Path, plan: StepPlan, start_step: int, console: Console, description: str = "train"):
        self.plan, self.console, self.start_step = plan, console, start_step
        self.log = MetricsLog(run_dir, resume_step=start_step) if distributed.is_main() else _NoLog()
        self.progress = training_progress(console)
        self.description = description
        self.last_loss: float | None = None
        self.last_eval: dict | None = None
        self.tokens_total = 0
        self.done = start_step  # optimizer steps completed so far
        self._tokens_window, self._window_start = 0, time.time()

    def __enter__(self) -> StepReporter:
        self.progress.__enter__()
        self._task = self.progress.add_task(self.description, total=self.plan.total, completed=self.start_step,
                                            loss="-", lr="-", tok_s="-")
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)
        self.log.close()

    def step(self, done: int, outcome: StepOutcome, *, lr: float, input_tokens: int, last: bool,
             reduced: dict[str, float] | None = None) -> None:
        """Count the step's tokens; on a logged step write its record and update the bar. ``reduced`` are
        stats the recipe already reduced (e.g. GRPO's reward means), logged as they are."""
        self.done = done
        self._tokens_window += input_tokens
        self.tokens_total += input_tokens
        if not self.plan.log_due(done, last):
            return
        elapsed = max(time.time() - self._window_start, 1e-9)
        tok_s = self._tokens_window / elapsed
        if distributed.world().distributed:  # every rank logs the same steps: one all-reduce of the window's tokens
            tok_s = float(distributed.all_sum([self._tokens_window])[0]) / elapsed
        self.last_loss = require_finite(outcome.loss_sum, done) / max(outcome.count, 1)
        record = {"step": done, "epoch": round(done / self.plan.per_epoch, 4), "loss": self.last_loss, "lr": lr,
                  "tokens_per_s": tok_s, "trained_tokens": outcome.count}
        if outcome.grad_norm is not None:
            record["grad_norm"] = float(outcome.grad_norm)
        record.update(per_unit(outcome.stats, outcome.count))
        record.update({key: float(value) for key, value in (reduced or {}).items()})
        self.log.log(record)
        self.progress.update(self._task, completed=done, loss=f"{self.last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
        total = self.plan.total
        if not self.progress.console.is_terminal and (done % max(1, total // 10) == 0 or last):
            self.progress.console.print(f"step {done}/{total}  loss {self.last_loss:.4f}  lr {lr:.2e}  {tok_s:,.0f} tok/s")
        self._tokens_window, self._window_start = 0, time.time()

    @staticmethod
    def require_finite(outcome: StepOutcome, done: int) -> None:
        """Stop (before a checkpoint is written) if the step's loss is not finite."""
        require_finite(outcome.loss_sum, done)

    def evaluation(self, done: int, metrics: dict[str, float]) -> None:
        """Record validation metrics (``eval_loss``, ``eval_ppl``, ...) of step ``done``."""
        self.last_eval = metrics
        self.log.log({"step": done, **metrics})
        shown = "  ".join(f"{k} {v:.4f}" if k != "eval_ppl" else f"ppl {v:.2f}" for k, v in metrics.items())
        self.progress.console.print(f"step {done}: {shown}")


class _NoLog:
    """The metrics log of a rank other than 0: rank 0 writes the run directory."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def per_unit(stats: dict, count: int) -> dict[str, float]:
    """A step's summed stats as means: over the step's units; for a stat ``KEY`` with a companion ``KEY@n``, over
    that count (the companion itself is not logged); for ``loss/NAME`` over ``tokens/NAME`` (a source of a
    mixture: its own trained tokens; logged as counts)."""
    out = {}
    for key, value in stats.items():
        if key.endswith("@n"):
            continue
        if f"{key}@n" in stats:
            out[key] = float(value) / max(float(stats[f"{key}@n"]), 1.0)
        elif key.startswith("tokens/"):
            out[key] = float(value)
        elif key.startswith("loss/") and f"tokens/{key[5:]}" in stats:
            tokens = float(stats[f"tokens/{key[5:]}"])
            if tokens:  # a source absent from the step has no loss to report
                out[key] = float(value) / tokens
        else:
            out[key] = float(value) / max(count, 1)
    return out


def training_progress(console: Console | None = None) -> Progress:
    """A rich progress bar for training: step, loss, learning rate, tokens/s and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[tok_s]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
