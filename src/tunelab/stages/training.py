"""The stages every training recipe goes through, in order, each a plain function a recipe calls:

1. :func:`check_environment` — precision and device resolved, the run directory checked (or the resume
   checked against what the run started with), evaluation and kernel settings validated;
2. :func:`prepare_training` — :func:`make_trainable` (kernels, gradient checkpointing, the method applied)
   then :func:`optimize` (the step plan, the optimizer and the restored checkpoint); a recipe that needs the
   start weights (a reference model's log-probabilities) calls the two itself;
3. :func:`begin_training_run` — one summary line, ``config.yaml`` and a ``running`` manifest;
4. :func:`train_and_save` — the recipe's own loop, costs (time, tokens/s, peak memory), the artifact.

What differs between recipes (their data, objective, loop and evaluation) stays in the recipe.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from tunelab.stages.optimize import Optimization, prepare_optimization, step_plan, trained_model
from tunelab.stages.run import RunStart, begin_run, check_start, save_artifact, train_or_fail
from tunelab.errors import TunelabError
from tunelab.training.distributed import all_sum, barrier, launched_world
from tunelab.training.device import device_kind, make_accelerator, peak_memory, precision_name, reset_peak_memory, resolve_precision
from tunelab.training.kernels import apply_kernels, check_kernels
from tunelab.training.reporter import StepReporter


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
    if strategy == "fsdp" and config.recipe.name == "grpo":
        raise TunelabError("distributed.strategy: fsdp cannot run recipe grpo: each rank samples its own prompts, and a "
                           "sharded model needs every rank in every forward pass; use ddp")


def prepare_training(config: RunConfig, env: Environment, base, tokenizer, added_tokens: list[str], train_examples: list,
                     console: Console) -> tuple[TunedModel, Optimization]:
    """The untuned ``base`` made trainable the method's way, and the optimisation state over ``train_examples``."""
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
             mixture: Mixture | None = None) -> Optimization:
    """The step plan over ``n_examples`` (or a ``mixture`` of them), the optimizer, and (on resume) the newest
    readable checkpoint restored."""
    plan = step_plan(config, n_examples, on_gpu=env.accelerator.device.type == "cuda", mixture=mixture)
    checkpoints = env.run_dir / "checkpoints" if env.start.resume else None
    opt = prepare_optimization(config, tuned, env.accelerator, plan, checkpoints, console)
    if mixture is not None:
        opt.sources = (mixture.of, mixture.names)
    return opt


def already_finished(env: Environment, opt: Optimization) -> bool:
    """A finished run resumed with nothing left to do."""
    previous = env.start.previous
    return bool(previous and previous.get("status") == "finished" and opt.finished)


def begin_training_run(config: RunConfig, env: Environment, tuned: TunedModel, opt: Optimization, model_path: str,
                       console: Console, what: str, chosen: list | None = None) -> dict[str, Any]:
    """Print what is about to train (one line, also in a sweep's log) and write config.yaml and the manifest (with
    the ``chosen`` data defaults, ``tunelab.training.defaults.Choice``, and why)."""
    n_trainable, n_total = count_parameters(tuned.model)
    console.print(f"[bold]{escape(config.method.name)}[/] on {escape(str(config.model.path))}: {n_trainable:,} trainable of {n_total:,} parameters "
                  f"({100 * n_trainable / n_total:.3f}%); {what}; device {env.accelerator.device}, precision {env.precision}",
                  soft_wrap=True)
    return begin_run(env.start, config, start_step=opt.start_step, model={"spec": config.model.path, "resolved": model_path},
                     method=config.method.name, precision=precision_name(env.accelerator), device=str(env.accelerator.device),
                     device_kind=env.accelerator.device.type, trainable_parameters=n_trainable, total_parameters=n_total, total_steps=opt.plan.total,
                     artifact=tuned.method.artifact, checkpointed_blocks=tuned.checkpointed_blocks,
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
    previous = env.start.previous or {}
    return TrainResult(env.run_dir, env.run_dir / artifact, steps, previous.get("final_train_loss"),
                       (previous.get("final_eval") or {}).get("eval_loss"), 0.0)


def result_of(env: Environment, trained: Trained) -> TrainResult:
    reporter = trained.reporter
    return TrainResult(env.run_dir, trained.artifact_dir, reporter.done, reporter.last_loss,
                       (reporter.last_eval or {}).get("eval_loss"), trained.seconds)


@dataclass
class Trained:
    """The outcome of :func:`train_and_save`."""

    model: Any  # the tuned model, unwrapped from accelerate, with the KV cache on again for evaluation
    reporter: StepReporter
    artifact_dir: Path
    costs: dict[str, Any]
    seconds: float


def train_and_save(config: RunConfig, env: Environment, opt: Optimization, tuned: TunedModel, tokenizer,
                   manifest: dict[str, Any], loop: Callable[[], StepReporter], console: Console,
                   save_extra: Callable[[Path], None] | None = None) -> Trained:
    """Run ``loop()`` (a diverged run is marked failed and leaves no artifact), then save the artifact atomically
    with the tokenizer and its chat template (and whatever ``save_extra(folder)`` adds, e.g. a reward head);
    costs go to the manifest when the recipe finishes the run."""
    reset_peak_memory()
    started = opt.loop_started = time.time()
    reporter = train_or_fail(env.run_dir, manifest, loop)
    seconds = time.time() - started
    carry_over(reporter, env.run_dir)
    tokens = float(all_sum([reporter.tokens_total])[0])  # every rank's share
    costs = {"train_seconds": round(opt.wall_seconds + seconds, 2),  # summed over invocations (resumes)
             "tokens_per_s": round(tokens / max(seconds, 1e-9), 1), "steps_done": reporter.done, **peak_memory()}
    if opt.best is not None:
        costs.update(opt.best.record())
        if (step := opt.best.restore(opt.params)) is not None:
            last = "the last step" if step == reporter.done else f"not step {reporter.done}'s"
            console.print(f"train.keep_best: the artifact holds step {step}'s weights (eval_loss {costs['best_eval_loss']:.4f}, "
                          f"the lowest of {costs['validations']} validations), {last}.")
    if reporter.done < opt.plan.total and "stopped_by" not in costs:
        costs["stopped_by"] = "max_seconds"
        console.print(f"train.max_seconds={config.train.max_seconds:g} reached after {reporter.done} of {opt.plan.total} steps.")
    model = trained_model(opt)
    def save(tmp: Path) -> None:
        tuned.method.save(model, tmp)
        if save_extra is not None:
            save_extra(tmp)

    artifact_dir, costs["artifact_mb"] = save_artifact(env.run_dir, tuned.method.artifact, save, tokenizer)
    n_trainable, n_total = manifest["trainable_parameters"], manifest["total_parameters"]
    console.print(f"Saved {tuned.method.artifact} to [bold]{escape(str(artifact_dir))}[/] ({costs['artifact_mb']:.1f} MB); "
                  f"trainable parameters {n_trainable:,} ({100 * n_trainable / n_total:.3f}% of {n_total:,}).", soft_wrap=True)
    model.config.use_cache = True
    return Trained(model, reporter, artifact_dir, costs, opt.wall_seconds + seconds)


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
