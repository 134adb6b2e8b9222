"""The stages every training recipe goes through, in order, each a plain function a recipe calls:

1. :func:`check_environment` — precision and device resolved, the run directory checked (or the resume
   checked against what the run started with), evaluation and kernel settings validated;
2. :func:`prepare_training` — :func:`make_trainable` (kernels, gradient checkpointing, the method applied)
   then :func:`optimize` (the step plan and the :class:`~tunelab.training.state.TrainingState`: optimizer,
   restored checkpoint); a recipe that needs the start weights (a reference model's log-probabilities)
   calls the two itself;
3. :func:`begin_training_run` — one summary line, ``config.yaml`` and a ``running`` manifest;
4. the recipe's own loop (``tunelab.training``) over the state, inside :func:`training_loop` (timing, peak
   memory, a failure recorded);
5. :func:`save_trained` — costs (time, tokens/s, peak memory), the best weights back, the artifact.

What differs between recipes (their data, objective, loop and evaluation) stays in the recipe.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from tunelab.atomic import recover_output
from tunelab.config.schema import RunConfig
from tunelab.methods import count_parameters
from tunelab.stages.evaluation import check_eval_settings
from tunelab.stages.lineage import read_parent
from tunelab.stages.model import TunedModel, apply_method, checkpointed_blocks
from tunelab.stages.setup import Mixture, mixture_of
from tunelab.stages.run import RunStart, begin_run, check_start, failure_recorded, save_artifact
from tunelab.errors import TunelabError
from tunelab.runs.manifest import Manifest
from tunelab.training import distributed
from tunelab.training.best import BestKeeper
from tunelab.training.distributed import all_sum, barrier, launched_world
from tunelab.training.device import (apply_kernels, check_kernels, device_kind, make_accelerator, peak_memory, precision_name,
                                     reset_peak_memory, resolve_precision)
from tunelab.training.plan import StepPlan
from tunelab.training.reporter import StepReporter
from tunelab.training.state import Checkpoints, Optimizer, TrainingState, start_state


@dataclass
class Environment:
    """Where and how the run computes, and the checked run directory."""

    start: RunStart
    precision: str  # fp32 | bf16 | fp16, resolved for this machine
    accelerator: Any

    @property
    def run_dir(self) -> Path:
        return self.start.run_dir


def check_environment(config: RunConfig, *, resume: bool, force: bool, data_files: list[str] | None = None,
                      task=None) -> Environment:
    """Everything cheap that can refuse the run before a model loads; ``task`` (``stages.setup.Examples``) are the
    examples the recipe evaluates on, for checking a reused ``eval.before_from``."""
    check_distributed(config)
    precision = resolve_precision(config.train.precision)
    start = check_start(config, resume=resume, force=force, precision=precision, device_kind=device_kind(),
                        data_files=data_files)
    check_eval_settings(config, task)
    check_kernels(config.train.kernels, device_kind())
    accelerator = make_accelerator(precision, config.distributed.timeout_minutes)
    barrier()  # every rank has checked the run directory before rank 0 writes to it
    return Environment(start, precision, accelerator)


def check_distributed(config: RunConfig) -> None:
    """Under a distributed launch, refuse a strategy that cannot run here before anything loads."""
    if not launched_world().distributed:
        return
    strategy = config.distributed.strategy
    if strategy == "deepspeed":
        raise TunelabError("distributed.strategy: deepspeed is not wired into tunelab's loop yet; use fsdp, which shards "
                           "parameters, gradients and optimizer state over the ranks as ZeRO-3 does, or ddp")
    if strategy == "fsdp" and config.recipe.needs.generation_rows:  # a generation phase before each step
        raise TunelabError(f"distributed.strategy: fsdp cannot run recipe {config.recipe.name}: each rank samples its own "
                           "prompts, and a sharded model needs every rank in every forward pass; use ddp")


def prepare_training(config: RunConfig, env: Environment, base, tokenizer, added_tokens: list[str], train_examples: list,
                     console: Console) -> tuple[TunedModel, TrainingState]:
    """The untuned ``base`` made trainable the method's way, and the training state over ``train_examples``."""
    tuned = make_trainable(config, env, base, tokenizer, added_tokens, train_examples, console)
    mixture = mixture_of(config, train_examples)
    if mixture is not None:
        console.print(f"Training mixture: {escape(mixture.describe())}.", soft_wrap=True)
    return tuned, optimize(config, env, tuned, len(train_examples), console, mixture)


def make_trainable(config: RunConfig, env: Environment, base, tokenizer, added_tokens: list[str], train_examples: list,
                   console: Console) -> TunedModel:
    """Kernels, gradient checkpointing (planned over ``train_examples``) and the method applied to ``base``."""
    blocks = checkpointed_blocks(config, train_examples, console)
    apply_kernels(base, config.train.kernels)
    return apply_method(config, base, tokenizer, added_tokens, blocks)


def optimize(config: RunConfig, env: Environment, tuned: TunedModel, n_examples: int, console: Console,
             mixture: Mixture | None = None) -> TrainingState:
    """The training state: the step plan over ``n_examples`` (or a ``mixture`` of them), AdamW over the trainable
    parameters, (on resume) the newest readable checkpoint restored, all placed by accelerate (DDP-wrapped under a
    distributed launch) or sharded first with ``distributed.strategy: fsdp``."""
    t = config.train
    fsdp = distributed.world().distributed and config.distributed.strategy == "fsdp"
    if fsdp and (t.keep_best or t.early_stopping):
        raise TunelabError("train.keep_best and train.early_stopping are not supported with distributed.strategy fsdp yet; "
                           "use ddp, or leave them out")
    plan = step_plan(config, n_examples, on_gpu=env.accelerator.device.type == "cuda", mixture=mixture)
    state = start_state(tuned.model, tuned.params, env.accelerator, plan, console=console,
                        optimizer=Optimizer(t.lr, t.weight_decay, t.max_grad_norm),
                        checkpoints=Checkpoints(env.run_dir, t.keep_last, resume=env.start.resume),
                        fsdp_offload=config.distributed.cpu_offload if fsdp else None)
    if t.keep_best or t.early_stopping:
        state.best = BestKeeper.open(config.output_dir, patience=t.early_stopping, keep=t.keep_best, start_step=state.start_step)
    if mixture is not None:
        state.sources = (mixture.of, mixture.names)
    return state


def step_plan(config: RunConfig, n_examples: int, on_gpu: bool, mixture: Mixture | None = None) -> StepPlan:
    """The config's training numbers as a :class:`StepPlan` over ``n_examples`` (and this process's share of it),
    drawn from a ``mixture`` when given."""
    t = config.train
    if mixture is None and config.data.mixture() is not None:
        raise TunelabError(f"data.train weights and data.replay apply to recipe sft; recipe {config.recipe.name} reads its "
                           "files concatenated: give plain paths")
    return StepPlan.build(mixture.epoch_size if mixture else n_examples, batch_size=t.batch_size, grad_accum=t.grad_accum, epochs=t.epochs,
                          max_steps=t.max_steps, seed=t.seed, lr=t.lr, schedule=t.schedule, warmup_ratio=t.warmup_ratio,
                          save_every=t.save_every, eval_every=t.eval_every, log_every=t.log_every, on_gpu=on_gpu,
                          max_seconds=t.max_seconds, world=distributed.world(),
                          mixture=mixture.sources if mixture else None)


def already_finished(env: Environment, state: TrainingState) -> bool:
    """A finished run resumed with nothing left to do."""
    previous = env.start.previous
    return bool(previous and previous.status == "finished" and state.finished)


def begin_training_run(config: RunConfig, env: Environment, tuned: TunedModel, state: TrainingState, model_path: str,
                       console: Console, what: str, chosen: list | None = None) -> Manifest:
    """Print what is about to train (one line, also in a sweep's log) and write config.yaml and the manifest (with
    the ``chosen`` data defaults, ``tunelab.training.defaults.Choice``, and why)."""
    n_trainable, n_total = count_parameters(tuned.model)
    console.print(f"[bold]{escape(config.method.name)}[/] on {escape(str(config.model.path))}: {n_trainable:,} trainable of {n_total:,} parameters "
                  f"({100 * n_trainable / n_total:.3f}%); {what}; device {env.accelerator.device}, precision {env.precision}",
                  soft_wrap=True)
    return begin_run(env.start, config, start_step=state.start_step, model={"spec": config.model.path, "resolved": model_path},
                     method=config.method.name, precision=precision_name(env.accelerator), device=str(env.accelerator.device),
                     device_kind=env.accelerator.device.type, trainable_parameters=n_trainable, total_parameters=n_total,
                     total_steps=state.plan.total, artifact=tuned.method.artifact, checkpointed_blocks=tuned.checkpointed_blocks,
                     **({"defaults_chosen": {c.key: {"value": c.value, "why": c.why} for c in chosen}} if chosen else {}),
                     **({"parent": parent.record()} if (parent := read_parent(config)) else {}))


@dataclass(frozen=True)
class TrainResult:
    """What a finished (or already finished) training run reports back."""

    run_dir: Path
    artifact_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None
    train_seconds: float


def nothing_to_do(env: Environment, artifact: str, steps: int, console: Console) -> TrainResult:
    """The result of resuming a finished run: its recorded numbers, nothing recomputed."""
    recover_output(env.run_dir / artifact)  # a save killed mid-replace: the artifact back, its temporaries gone
    console.print(Text(f"{env.run_dir} already finished ({steps} steps); nothing to do."))
    previous = env.start.previous or Manifest()
    return TrainResult(env.run_dir, env.run_dir / artifact, steps, previous.final_train_loss,
                       (previous.final_eval or {}).get("eval_loss"), 0.0)


@contextlib.contextmanager
def training_loop(env: Environment, state: TrainingState, manifest: Manifest) -> Iterator[None]:
    """Around a recipe's loop: peak memory counted from its start, its wall time kept in ``state``, and whatever ends
    it (divergence, a full disk, Ctrl-C, a bug) marks the run failed or interrupted (and is re-raised)."""
    reset_peak_memory()
    started = state.loop_started = time.time()
    with failure_recorded(env.run_dir, manifest):
        yield
    state.loop_seconds = time.time() - started


@dataclass
class Trained:
    """The outcome of :func:`save_trained`."""

    model: Any  # the tuned model, unwrapped from accelerate, with the KV cache on again for evaluation
    reporter: StepReporter
    artifact_dir: Path
    costs: dict[str, Any]  # the manifest's cost fields
    seconds: float  # the training loops' wall time, summed over invocations

    def result(self, env: Environment) -> TrainResult:
        """What the recipe returns."""
        last_eval = self.reporter.last_eval or {}
        return TrainResult(env.run_dir, self.artifact_dir, self.reporter.done, self.reporter.last_loss, last_eval.get("eval_loss"),
                           self.seconds)


def save_trained(config: RunConfig, env: Environment, state: TrainingState, tuned: TunedModel, tokenizer, manifest: Manifest,
                 reporter: StepReporter, console: Console, extra_modules: dict[str, torch.nn.Module] | None = None) -> Trained:
    """After the loop (:func:`training_loop`): its costs (time, tokens/s, peak memory, early stopping), the best
    weights back with ``train.keep_best``, and the artifact saved atomically with the tokenizer and its chat template
    (and each of ``extra_modules``' weights in the file it is keyed by, e.g. a reward head); the costs go to the
    manifest when the recipe finishes the run."""
    carry_over(reporter, env.run_dir)
    seconds = state.loop_seconds
    tokens = float(all_sum([reporter.tokens_total])[0])  # every rank's share
    costs = {"train_seconds": round(state.wall_seconds + seconds, 2),  # summed over invocations (resumes)
             "tokens_per_s": round(tokens / max(seconds, 1e-9), 1), "steps_done": reporter.done, **peak_memory()}
    if state.best is not None:
        costs.update(state.best.record())
        if (step := state.best.restore(state.params)) is not None:
            last = "the last step" if step == reporter.done else f"not step {reporter.done}'s"
            console.print(f"train.keep_best: the artifact holds step {step}'s weights (eval_loss {costs['best_eval_loss']:.4f}, "
                          f"the lowest of {costs['validations']} validations), {last}.")
    if reporter.done < state.plan.total and "stopped_by" not in costs:
        costs["stopped_by"] = "max_seconds"
        console.print(f"train.max_seconds={config.train.max_seconds:g} reached after {reporter.done} of {state.plan.total} steps.")
    model = state.trained_model()
    artifact_dir, costs["artifact_mb"] = save_artifact(env.run_dir, tuned.method, model, tokenizer, extra_modules or {})
    n_trainable, n_total = manifest.trainable_parameters, manifest.total_parameters
    console.print(f"Saved {tuned.method.artifact} to [bold]{escape(str(artifact_dir))}[/] ({costs['artifact_mb']:.1f} MB); "
                  f"trainable parameters {n_trainable:,} ({100 * n_trainable / n_total:.3f}% of {n_total:,}).", soft_wrap=True)
    model.config.use_cache = True
    return Trained(model, reporter, artifact_dir, costs, state.wall_seconds + seconds)


def carry_over(reporter: StepReporter, run_dir: Path) -> None:
    """Give ``reporter`` the last training loss and validation metrics logged before this invocation, where this one
    logged none (a resume that found every step done, or continued without a validation): the final numbers are
    those of the whole run, read back from ``metrics.jsonl`` (what the reporter wrote; kept up to the resumed step)."""
    if reporter.last_loss is not None and reporter.last_eval is not None:
        return
    path = run_dir / "metrics.jsonl"
    last_loss, last_eval = None, None
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] > reporter.done:
            continue
        if "loss" in record:
            last_loss = record["loss"]
        elif any(key.startswith("eval_") for key in record):  # a validation: {"step", "eval_loss", ...}
            last_eval = {key: value for key, value in record.items() if key != "step"}
    if reporter.last_loss is None:
        reporter.last_loss = last_loss
    if reporter.last_eval is None:
        reporter.last_eval = last_eval
