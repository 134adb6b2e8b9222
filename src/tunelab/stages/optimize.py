"""The optimisation state of a run: step plan, optimizer, restored checkpoint, device placement, checkpoint saves.

A checkpoint holds weights, optimizer, RNG states, the step and the seconds spent (``train_seconds``: optimizer
steps only, what ``train.max_seconds`` budgets; ``wall_seconds``: the training loops' wall time, summed over the
invocations that led to it, what the manifest reports); the step plan (``training.plan``) is a pure function of
the config, so nothing else is needed to continue exactly.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from tunelab.training.best import BestKeeper
from tunelab.config.schema import RunConfig
from tunelab.errors import TunelabError
from tunelab.stages.model import TunedModel
from tunelab.training import distributed
from tunelab.training.checkpoint import load_latest_checkpoint, rng_states, save_checkpoint
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
    whole: torch.nn.Module | None = None  # FSDP: an unsharded CPU copy the trained shards are gathered into at the end
    sources: tuple[tuple[int, ...], tuple[str, ...]] | None = None  # a mixture: each example's source, the source names
    best: BestKeeper | None = None  # train.keep_best / train.early_stopping
    wall_seconds: float = 0.0  # the training loops' wall time before this invocation (from the checkpoint resumed)
    loop_started: float | None = None  # time.time() when this invocation's loop started

    def wall_seconds_now(self) -> float:
        """The training loops' wall time so far, this invocation's included."""
        return self.wall_seconds + (time.time() - self.loop_started if self.loop_started is not None else 0.0)

    @property
    def finished(self) -> bool:
        """Nothing left to do: every step done, the time budget spent, or early stopping ended it."""
        stopped = self.best is not None and self.best.stopped
        return self.start_step >= self.plan.total or self.plan.out_of_time(self.seconds_spent) or stopped


def step_plan(config: RunConfig, n_examples: int, on_gpu: bool, mixture=None) -> StepPlan:
    """The config's training numbers as a :class:`StepPlan` over ``n_examples`` (and this process's share of it),
    drawn from a ``stages.setup.Mixture`` when given."""
    t = config.train
    if mixture is None and config.data.mixture() is not None:
        raise TunelabError(f"data.train weights and data.replay apply to recipe sft; recipe {config.recipe.name} reads its "
                           "files concatenated: give plain paths")
    return StepPlan.build(mixture.epoch_size if mixture else n_examples, batch_size=t.batch_size, grad_accum=t.grad_accum, epochs=t.epochs,
                          max_steps=t.max_steps, seed=t.seed, lr=t.lr, schedule=t.schedule, warmup_ratio=t.warmup_ratio,
                          save_every=t.save_every, eval_every=t.eval_every, log_every=t.log_every, on_gpu=on_gpu,
                          max_seconds=t.max_seconds, world=distributed.world(),
                          mixture=mixture.sources if mixture else None)


def prepare_optimization(config: RunConfig, tuned: TunedModel, accelerator, plan: StepPlan, checkpoints: Path | None,
                         console: Console) -> Optimization:
    """AdamW over the trainable parameters, the newest readable checkpoint under ``checkpoints`` restored (when
    resuming: not None), all placed by accelerate (DDP-wrapped under a distributed launch), or sharded first
    with ``distributed.strategy: fsdp``."""
    fsdp = distributed.world().distributed and config.distributed.strategy == "fsdp"
    whole = None
    if fsdp:
        whole = copy.deepcopy(tuned.model).cpu()
        distributed.shard_model(tuned.model, config.distributed.cpu_offload)
        shards = dict(tuned.model.named_parameters())
        tuned.params = {name: shards[name] for name in tuned.params}
    optimizer = adamw(list(tuned.params.values()), lr=config.train.lr, weight_decay=config.train.weight_decay)
    start_step, scaler_state, seconds, wall = 0, None, 0.0, 0.0
    restored = None
    if checkpoints is not None:
        def skipped(path: Path, reason: str) -> None:
            console.print(f"[yellow]warning:[/] checkpoint {escape(str(path))} cannot be read ({escape(reason)}); trying the one before it", soft_wrap=True)

        restored = load_latest_checkpoint(checkpoints, tuned.params, optimizer, on_skip=skipped)
    if checkpoints is not None and restored is None:
        console.print(f"No readable checkpoint in {escape(str(config.output_dir))} yet: starting again from step 0.")
    if restored is not None:
        if restored.step > plan.total:
            raise TunelabError(f"--resume: the newest checkpoint is at step {restored.step}, beyond this config's {plan.total} "
                               "steps; raise train.max_steps/train.epochs or start a new run")
        console.print(f"Resuming from {escape(str(restored.path))} (step {restored.step}).")
        state = restored.state
        start_step, scaler_state, seconds = restored.step, state.get("grad_scaler"), state.get("train_seconds", 0.0)
        wall = state.get("wall_seconds", seconds)  # a checkpoint of an earlier tunelab: its step time at least
    if fsdp:
        model, optimizer = tuned.model, accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(tuned.model, optimizer)
    if scaler_state and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(scaler_state)
    best = None
    if config.train.keep_best or config.train.early_stopping:
        if fsdp:
            raise TunelabError("train.keep_best and train.early_stopping are not supported with distributed.strategy fsdp yet; "
                               "use ddp, or leave them out")
        best = BestKeeper.open(config.output_dir, patience=config.train.early_stopping, keep=config.train.keep_best,
                               start_step=start_step)
    return Optimization(model, optimizer, tuned.params, accelerator, plan, start_step, seconds, whole, best=best,
                        wall_seconds=wall)


def trained_model(opt: Optimization) -> torch.nn.Module:
    """The model at the end of training, whole: as it trained, or (FSDP) the trained shards gathered into the
    unsharded copy (on every rank, so the evaluation after training runs as it does in one process)."""
    model = opt.accelerator.unwrap_model(opt.model)
    if opt.whole is None:
        return model
    whole = dict(opt.whole.named_parameters())
    with torch.no_grad():
        for name, param in opt.params.items():
            whole[name].copy_(distributed.full_tensor(param).cpu())
    return opt.whole.to(opt.accelerator.device)


def save_state(opt: Optimization, run_dir: Path, done: int, seconds_spent: float, keep_last: int) -> None:
    """Checkpoint step ``done`` (with the time spent and the fp16 grad-scaler state, if any). With several
    processes every rank calls it (FSDP shards are gathered), rank 0 writes, and the others wait for it."""
    scaler = opt.accelerator.scaler
    extra = {"epoch": opt.plan.epoch_of(done - 1), "train_seconds": seconds_spent, "wall_seconds": opt.wall_seconds_now(),
             **({"grad_scaler": scaler.state_dict()} if scaler else {})}
    if not distributed.world().distributed:
        save_checkpoint(run_dir / "checkpoints", done, opt.params, opt.optimizer, extra, keep_last)
        return
    params = {name: distributed.full_tensor(p) for name, p in opt.params.items()}
    optimizer = _Gathered(opt.optimizer.state_dict())
    rngs = distributed.gather_objects(rng_states())
    if distributed.is_main():
        save_checkpoint(run_dir / "checkpoints", done, params, optimizer, extra, keep_last, other_ranks=rngs[1:])
    distributed.barrier()


class _Gathered:
    """An optimizer's state with FSDP-sharded tensors gathered whole (a collective), as ``save_checkpoint`` reads it."""

    def __init__(self, state: dict):
        self._state = {"state": {i: {k: distributed.full_tensor(v) if torch.is_tensor(v) else v for k, v in per.items()}
                                 for i, per in state["state"].items()},
                       "param_groups": state["param_groups"]}

    def state_dict(self) -> dict:
        return self._state
