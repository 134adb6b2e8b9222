"""The training state a loop steps: model, optimizer, step plan, where the run stands, and its checkpoints.

:func:`start_state` builds it (AdamW over the trainable parameters, the newest readable checkpoint restored
on a resume, everything placed by accelerate, or sharded first under FSDP); the loops
(``token_loop``, ``pair_loop``, ``grpo_loop``) step it and :meth:`TrainingState.save` checkpoints it;
:meth:`TrainingState.trained_model` is the model to save when the loop ends.

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

from tunelab.errors import TunelabError
from tunelab.training import distributed
from tunelab.training.best import BestKeeper
from tunelab.training.checkpoint import load_latest_checkpoint, rng_states, save_checkpoint
from tunelab.training.optim import adamw
from tunelab.training.plan import StepPlan


@dataclass
class TrainingState:
    """What the loop steps: the prepared model and optimizer, the plan, where the run stands and where it checkpoints."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: dict[str, torch.nn.Parameter]
    accelerator: object
    plan: StepPlan
    run_dir: Path  # metrics.jsonl and checkpoints/ go here
    keep_last: int  # checkpoints kept
    max_grad_norm: float | None  # gradient clipping of every optimizer step (None: none)
    start_step: int = 0
    seconds_spent: float = 0.0  # optimizer-step seconds before this invocation (train.max_seconds budgets them)
    whole: torch.nn.Module | None = None  # FSDP: an unsharded CPU copy the trained shards are gathered into at the end
    sources: tuple[tuple[int, ...], tuple[str, ...]] | None = None  # a mixture: each example's source, the source names
    best: BestKeeper | None = None  # train.keep_best / train.early_stopping
    wall_seconds: float = 0.0  # the training loops' wall time before this invocation (from the checkpoint resumed)
    loop_started: float | None = None  # time.time() when this invocation's loop started
    loop_seconds: float = 0.0  # this invocation's loop wall time, once it ended

    def wall_seconds_now(self) -> float:
        """The training loops' wall time so far, this invocation's included."""
        return self.wall_seconds + (time.time() - self.loop_started if self.loop_started is not None else 0.0)

    @property
    def finished(self) -> bool:
        """Nothing left to do: every step done, the time budget spent, or early stopping ended it."""
        stopped = self.best is not None and self.best.stopped
        return self.start_step >= self.plan.total or self.plan.out_of_time(self.seconds_spent) or stopped

    def save(self, done: int, seconds_spent: float) -> None:
        """Checkpoint step ``done`` (with the time spent and the fp16 grad-scaler state, if any). With several
        processes every rank calls it (FSDP shards are gathered), rank 0 writes, and the others wait for it."""
        scaler = self.accelerator.scaler
        extra = {"epoch": self.plan.epoch_of(done - 1), "train_seconds": seconds_spent, "wall_seconds": self.wall_seconds_now(),
                 **({"grad_scaler": scaler.state_dict()} if scaler else {})}
        root = self.run_dir / "checkpoints"
        if not distributed.world().distributed:
            save_checkpoint(root, done, self.params, self.optimizer, extra, self.keep_last)
            return
        params = {name: distributed.full_tensor(p) for name, p in self.params.items()}
        optimizer = _Gathered(self.optimizer.state_dict())
        rngs = distributed.gather_objects(rng_states())
        if distributed.is_main():
            save_checkpoint(root, done, params, optimizer, extra, self.keep_last, other_ranks=rngs[1:])
        distributed.barrier()

    def trained_model(self) -> torch.nn.Module:
        """The model at the end of training, whole: as it trained, or (FSDP) the trained shards gathered into the
        unsharded copy (on every rank, so the evaluation after training runs as it does in one process)."""
        model = self.accelerator.unwrap_model(self.model)
        if self.whole is None:
            return model
        whole = dict(self.whole.named_parameters())
        with torch.no_grad():
            for name, param in self.params.items():
                whole[name].copy_(distributed.full_tensor(param).cpu())
        return self.whole.to(self.accelerator.device)


@dataclass(frozen=True)
class Optimizer:
    """How the state's optimizer steps: AdamW's learning rate and weight decay, and gradient clipping."""

    lr: float
    weight_decay: float
    max_grad_norm: float | None


@dataclass(frozen=True)
class Checkpoints:
    """Where the state checkpoints, how many it keeps, and whether it resumes from the newest readable one."""

    run_dir: Path
    keep_last: int
    resume: bool


def start_state(model: torch.nn.Module, params: dict[str, torch.nn.Parameter], accelerator, plan: StepPlan, *,
                optimizer: Optimizer, checkpoints: Checkpoints, console: Console, fsdp_offload: bool | None = None) -> TrainingState:
    """AdamW over ``params`` (the trainable parameters of ``model``), the newest readable checkpoint restored (when
    resuming), all placed by ``accelerator`` (DDP-wrapped under a distributed launch), or sharded first under FSDP
    (``fsdp_offload`` not None: whether to offload the shards to the CPU). ``params`` is updated to the shards."""
    whole = None
    if fsdp_offload is not None:
        whole = copy.deepcopy(model).cpu()
        distributed.shard_model(model, fsdp_offload)
        shards = dict(model.named_parameters())
        params.update({name: shards[name] for name in params})
    adam = adamw(list(params.values()), lr=optimizer.lr, weight_decay=optimizer.weight_decay)
    state = TrainingState(model, adam, params, accelerator, plan, checkpoints.run_dir, checkpoints.keep_last,
                          optimizer.max_grad_norm, whole=whole)
    scaler_state = _restore(state, checkpoints, console) if checkpoints.resume else None
    if whole is not None:
        state.optimizer = accelerator.prepare(adam)
    else:
        state.model, state.optimizer = accelerator.prepare(model, adam)
    if scaler_state and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(scaler_state)
    return state


def _restore(state: TrainingState, checkpoints: Checkpoints, console: Console) -> dict | None:
    """Load the newest readable checkpoint into ``state`` (weights, optimizer, RNG, step, seconds); returns the
    grad-scaler state it holds, if any (loaded once accelerate has made the scaler)."""
    def skipped(path: Path, reason: str) -> None:
        console.print(f"[yellow]warning:[/] checkpoint {escape(str(path))} cannot be read ({escape(reason)}); trying the one before it", soft_wrap=True)

    restored = load_latest_checkpoint(checkpoints.run_dir / "checkpoints", state.params, state.optimizer, on_skip=skipped)
    if restored is None:
        console.print(f"No readable checkpoint in {escape(str(checkpoints.run_dir))} yet: starting again from step 0.")
        return None
    if restored.step > state.plan.total:
        raise TunelabError(f"--resume: the newest checkpoint is at step {restored.step}, beyond this config's {state.plan.total} "
                           "steps; raise train.max_steps/train.epochs or start a new run")
    console.print(f"Resuming from {escape(str(restored.path))} (step {restored.step}).")
    saved = restored.state
    state.start_step, state.seconds_spent = restored.step, saved.get("train_seconds", 0.0)
    state.wall_seconds = saved.get("wall_seconds", state.seconds_spent)  # a checkpoint of an earlier tunelab: its step time at least
    return saved.get("grad_scaler")


class _Gathered:
    """An optimizer's state with FSDP-sharded tensors gathered whole (a collective), as ``save_checkpoint`` reads it."""

    def __init__(self, state: dict):
        self._state = {"state": {i: {k: distributed.full_tensor(v) if torch.is_tensor(v) else v for k, v in per.items()}
                                 for i, per in state["state"].items()},
                       "param_groups": state["param_groups"]}

    def state_dict(self) -> dict:
        return self._state
