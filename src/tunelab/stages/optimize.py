"""The optimisation state of a run: step plan, optimizer, restored checkpoint, device placement, checkpoint saves.

A checkpoint holds weights, optimizer, RNG states, the step and the seconds spent; the step plan
(``training.plan``) is a pure function of the config, so nothing else is needed to continue exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from tunelab.config.schema import RunConfig
from tunelab.errors import TunelabError
from tunelab.stages.model import TunedModel
from tunelab.training.checkpoint import load_latest_checkpoint, save_checkpoint
from tunelab.training.optim import adamw
from tunelab.training.plan import StepPlan


@dataclass
class Optimization:
    """What the loop steps: the prepared model and optimizer, the plan, and where the run stands."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: dict[str, torch.nn.Parameter]
    accelerator: object
    plan: StepPlan
    start_step: int
    seconds_spent: float

    @property
    def finished(self) -> bool:
        """Nothing left to do: every step done, or the time budget spent."""
        return self.start_step >= self.plan.total or self.plan.out_of_time(self.seconds_spent)


def step_plan(config: RunConfig, n_examples: int, on_gpu: bool) -> StepPlan:
    """The config's training numbers as a :class:`StepPlan` over ``n_examples``."""
    t = config.train
    return StepPlan.build(n_examples, batch_size=t.batch_size, grad_accum=t.grad_accum, epochs=t.epochs,
                          max_steps=t.max_steps, seed=t.seed, lr=t.lr, schedule=t.schedule, warmup_ratio=t.warmup_ratio,
                          save_every=t.save_every, eval_every=t.eval_every, log_every=t.log_every, on_gpu=on_gpu,
                          max_seconds=t.max_seconds)


def prepare_optimization(config: RunConfig, tuned: TunedModel, accelerator, plan: StepPlan, checkpoints: Path | None,
                         console: Console) -> Optimization:
    """AdamW over the trainable parameters, the newest readable checkpoint under ``checkpoints`` restored (when
    resuming: not None), all placed by accelerate."""
    optimizer = adamw(list(tuned.params.values()), lr=config.train.lr, weight_decay=config.train.weight_decay)
    start_step, scaler_state, seconds = 0, None, 0.0
    restored = None
    if checkpoints is not None:
        def skipped(path: Path, reason: str) -> None:
            console.print(f"[yellow]warning:[/] checkpoint {path} cannot be read ({reason}); trying the one before it", soft_wrap=True)

        restored = load_latest_checkpoint(checkpoints, tuned.params, optimizer, on_skip=skipped)
    if checkpoints is not None and restored is None:
        console.print(f"No readable checkpoint in {config.output_dir} yet: starting again from step 0.")
    if restored is not None:
        if restored.step > plan.total:
            raise TunelabError(f"--resume: the newest checkpoint is at step {restored.step}, beyond this config's {plan.total} "
                               "steps; raise train.max_steps/train.epochs or start a new run")
        console.print(f"Resuming from {restored.path} (step {restored.step}).")
        state = restored.state
        start_step, scaler_state, seconds = restored.step, state.get("grad_scaler"), state.get("train_seconds", 0.0)
    model, optimizer = accelerator.prepare(tuned.model, optimizer)
    if scaler_state and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(scaler_state)
    return Optimization(model, optimizer, tuned.params, accelerator, plan, start_step, seconds)


def save_state(opt: Optimization, run_dir: Path, done: int, seconds_spent: float, keep_last: int) -> None:
    """Checkpoint step ``done`` (with the time spent and the fp16 grad-scaler state, if any)."""
    scaler = opt.accelerator.scaler
    extra = {"epoch": opt.plan.epoch_of(done - 1), "train_seconds": seconds_spent,
             **({"grad_scaler": scaler.state_dict()} if scaler else {})}
    save_checkpoint(run_dir / "checkpoints", done, opt.params, opt.optimizer, extra, keep_last)
