"""Supervised fine-tuning recipe: validate → set up → train (resumable) → save, read top to bottom.

The loop is ours (on accelerate for devices and mixed precision) because correct gradient
accumulation, bit-identical resume and speed are decided there:

* the loss of an optimizer step is the sum of token losses over all its micro-batches divided by the
  number of trained tokens in the whole step (not a mean of per-micro-batch means);
* the learning rate is a function of the step and the data order a function of (seed, epoch), so a
  checkpoint needs only weights, optimizer and RNG states to continue exactly.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from rich.console import Console

from tunelab.atomic import atomic_dir, write_text_atomic
from tunelab.config.load import config_hash, method_options, resolved_dict
from tunelab.config.schema import RunConfig
from tunelab.data import collate, data_fingerprint
from tunelab.errors import TunelabError
from tunelab.methods import count_parameters, get_method, trainable_parameters
from tunelab.evaluation.run import LoadedModel
from tunelab.stages.evaluation import check_eval_settings, evaluate_after, evaluate_before, save_before
from tunelab.stages.setup import load_base_model, load_prepared_tokenizer, read_examples, tokenize
from tunelab.training.checkpoint import load_checkpoint, save_checkpoint
from tunelab.training.kernels import apply_kernels, check_kernels
from tunelab.training.loss import summed_loss_of_batch, to_device, trained_token_count
from tunelab.training.manifest import write_manifest
from tunelab.training.metrics import MetricsLog
from tunelab.training.progress import training_progress
from tunelab.training.recompute import EVERY_BLOCK, enable_checkpointing, limit_checkpointing
from tunelab.training.rundir import check_run_dir, dir_size_mb, finish_manifest, new_manifest
from tunelab.training.schedule import epoch_batches, lr_at, warmup_steps
from tunelab.training.validation import validation_loss


@dataclass
class TrainResult:
    run_dir: Path
    artifact_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None
    train_seconds: float


def main(config: RunConfig, *, resume: bool = False, force: bool = False, console: Console | None = None) -> TrainResult:
    """Run supervised fine-tuning as configured; see the README for the run-directory layout."""
    console = console or Console(stderr=True)
    run_dir = Path(config.output_dir)
    resolved = resolved_dict(config)

    # 1. Validate everything cheap before anything expensive: data records, then the run directory.
    examples = read_examples(config)
    data_hash = data_fingerprint(_hashed_inputs(config))
    resume_from, previous = check_run_dir(run_dir, resume, force, resolved, data_hash)
    check_eval_settings(config)
    check_method_fits(config)
    check_kernels(config.train.kernels, "cuda" if torch.cuda.is_available() else "cpu")

    # 2. Tokenizer, tokenized data, model with the tuning method applied, optimizer (and checkpoint state).
    model_path, tokenizer, added_tokens = load_prepared_tokenizer(config)
    data = tokenize(config, tokenizer, examples, added_tokens)
    if config.data.eval_files() and not data.eval:
        console.print("[yellow]warning:[/] every eval example was dropped as too long; no validation loss will be computed")
    total = _total_steps(config, len(data.train))
    accelerator = _accelerator(config.train.precision)
    blocks = _checkpointed_blocks(config, data.train, console)
    base = _load_base(config, model_path, tokenizer, added_tokens, accelerator.device)
    before = evaluate_before(config, LoadedModel(base, tokenizer, "untuned"), examples, run_dir, console)
    apply_kernels(base, config.train.kernels)
    model, method, params, blocks = _apply_method(config, base, tokenizer, added_tokens, blocks)
    optimizer = adamw(list(params.values()), lr=config.train.lr, weight_decay=config.train.weight_decay)
    start_step, scaler_state, seconds_spent = _restore(resume_from, params, optimizer, total, run_dir, resume, console)
    out_of_time = config.train.max_seconds is not None and seconds_spent >= config.train.max_seconds
    if previous and previous.get("status") == "finished" and (start_step == total or out_of_time):
        console.print(f"{run_dir} already finished ({start_step} steps); nothing to do.")
        return TrainResult(run_dir, run_dir / method.artifact, start_step, previous.get("final_train_loss"),
                           (previous.get("final_eval") or {}).get("eval_loss"), 0.0)
    n_trainable, n_total = count_parameters(model)
    console.print(
        f"[bold]{config.method.name}[/] on {config.model.path}: {n_trainable:,} trainable of {n_total:,} parameters "
        f"({100 * n_trainable / n_total:.3f}%); {len(data.train)} train / {len(data.eval)} eval examples, "
        f"{data.train_stats.trained_tokens:,} trained tokens; device {accelerator.device}, "
        f"precision {'fp32' if accelerator.mixed_precision == 'no' else accelerator.mixed_precision}",
        soft_wrap=True,  # one line, also in a sweep's log
    )

    # 3. The run directory describes itself from the start.
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    manifest = new_manifest(
        previous, start_step if resume else None,
        model={"spec": config.model.path, "resolved": model_path}, method=config.method.name,
        config_hash=config_hash(resolved), data_hash=data_hash, data_files=_hashed_inputs(config),
        precision=accelerator.mixed_precision, device=str(accelerator.device),
        trainable_parameters=n_trainable, total_parameters=n_total, artifact=method.artifact,
        checkpointed_blocks=blocks,
    )
    write_manifest(run_dir, manifest)
    save_before(run_dir, before)

    # 4. Train; a diverged run is marked failed and leaves no artifact.
    model, optimizer = accelerator.prepare(model, optimizer)
    if scaler_state and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(scaler_state)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    try:
        last_loss, last_eval, tokens_trained, steps_done = _train_loop(
            config, model, optimizer, params, data, accelerator, run_dir, start_step, seconds_spent, tokenizer, console)
    except TunelabError:
        write_manifest(run_dir, {**manifest, "status": "failed"})
        raise
    train_seconds = time.time() - started
    costs = {"train_seconds": round(train_seconds, 2), "tokens_per_s": round(tokens_trained / max(train_seconds, 1e-9), 1),
             "steps_done": steps_done, **peak_memory()}
    if steps_done < total:
        costs["stopped_by"] = "max_seconds"
        console.print(f"train.max_seconds={config.train.max_seconds:g} reached after {steps_done} of {total} steps.")

    # 5. Save the artifact (atomically) with the tokenizer and its chat template; finish the manifest.
    artifact_dir = run_dir / method.artifact
    with atomic_dir(artifact_dir) as tmp:
        method.save(accelerator.unwrap_model(model), tmp)
        tokenizer.save_pretrained(tmp)
    costs["artifact_mb"] = round(dir_size_mb(artifact_dir), 3)
    console.print(f"Saved {method.artifact} to [bold]{artifact_dir}[/] ({costs['artifact_mb']:.1f} MB); "
                  f"trainable parameters {n_trainable:,} ({100 * n_trainable / n_total:.3f}% of {n_total:,}).", soft_wrap=True)

    # 6. What it learned and what it forgot: the tuned model against the untuned one.
    tuned = accelerator.unwrap_model(model)
    tuned.config.use_cache = True
    report = evaluate_after(config, LoadedModel(tuned, tokenizer, "tuned"), examples, before, run_dir, console)
    write_manifest(run_dir, finish_manifest(manifest, **costs, final_train_loss=last_loss,
                                            final_eval=last_eval, eval_summary=_eval_summary(report)))
    return TrainResult(run_dir, artifact_dir, steps_done, last_loss, (last_eval or {}).get("eval_loss"), train_seconds)


def check_method_fits(config: RunConfig) -> None:
    """Refuse, before anything loads, run features the tuning method cannot be combined with."""
    method = get_method(config.method.name)
    asked = {"packing": config.train.packing, "gradient_checkpointing": config.train.gradient_checkpointing is True}
    clashes = sorted(feature for feature, on in asked.items() if on and feature in method.incompatible)
    if clashes:
        raise TunelabError(f"method {method.name} cannot be combined with " + ", ".join(f"train.{c}=true" for c in clashes)
                           + " (it changes the sequence the model attends over); set " + ", ".join(f"train.{c}=false" for c in clashes))


def adamw(params: list[torch.Tensor], **options) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where the parameters' device and dtype have one (CUDA, and CPU since
    torch 2.4: 5-6x faster steps than the default for-each kernel for SmolLM2's 135M weights), else the default."""
    try:
        return torch.optim.AdamW(params, fused=True, **options)
    except (RuntimeError, ValueError):  # no fused kernel for these parameters
        return torch.optim.AdamW(params, **options)


def peak_memory() -> dict:
    """Peak memory of this process: CUDA allocations on a GPU, else the resident set size (whole process lifetime)."""
    if torch.cuda.is_available():
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1), "peak_memory_kind": "cuda_max_allocated"}
    import resource

    return {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "peak_memory_kind": "cpu_peak_rss"}


def _load_base(config: RunConfig, model_path: str, tokenizer, added_tokens: list[str], device):
    """The untuned model on ``device``, loaded as the method needs (quantized for QLoRA), with embeddings
    resized for tokens a chat-template fallback added."""
    torch.manual_seed(config.train.seed)
    extra = get_method(config.method.name).base_load_kwargs(method_options(config))
    return load_base_model(config, model_path, tokenizer, added_tokens, device, **extra)


def _checkpointed_blocks(config: RunConfig, train_examples: list, console) -> int:
    """Decoder blocks to checkpoint: none, all, or for ``auto`` as many as the memory plan of this data on
    this device needs (``tunelab.planning.checkpointed_blocks``)."""
    setting = config.train.gradient_checkpointing
    if setting != "auto":
        return EVERY_BLOCK if setting else 0
    from tunelab.planning import AUTO_CHECKPOINTING_SHARE, checkpointed_blocks, load_shape, profile_examples, resolve_device

    try:
        shape, device = load_shape(config), resolve_device("current")
        blocks = checkpointed_blocks(config, shape, device, profile_examples(config, train_examples))
    except Exception as exc:  # noqa: BLE001 - a model the planner cannot read (e.g. no intermediate_size) must still train
        console.print(f"[yellow]warning:[/] no memory plan for this model ({type(exc).__name__}: {exc}); "
                      "train.gradient_checkpointing=auto leaves checkpointing off (set true to force it)", soft_wrap=True)
        return 0
    if blocks:
        console.print(f"gradient checkpointing in {blocks} of {shape.layers} blocks (train.gradient_checkpointing=auto: the "
                      f"planned peak must fit {AUTO_CHECKPOINTING_SHARE:.0%} of {device.memory_bytes / 2**30:.1f} GiB; "
                      "see tunelab plan)", soft_wrap=True)
    return blocks


def _apply_method(config: RunConfig, model, tokenizer, added_tokens: list[str], checkpointed: int = 0):
    """Apply the tuning method with gradient checkpointing in the first ``checkpointed`` decoder blocks;
    returns (model, method, trainable parameters by name, blocks that checkpoint)."""
    torch.manual_seed(config.train.seed)
    enable_checkpointing(model, checkpointed)
    model.config.use_cache = False
    method = get_method(config.method.name)
    options = method_options(config)
    if added_tokens and "trainable_token_indices" in type(options).model_fields and options.trainable_token_indices is None:
        # Tokens added by the chat-template fallback start random; train their rows so the model can
        # read <|im_start|> and learn to emit <|im_end|>.
        options = options.model_copy(update={"trainable_token_indices": tokenizer.convert_tokens_to_ids(added_tokens)})
    elif added_tokens and method.name != "full" and "trainable_token_indices" not in type(options).model_fields:
        raise TunelabError(
            f"the model has no chat template, so tunelab added the tokens {added_tokens}, whose embeddings start random; "
            f"method {method.name} cannot train them. Give data.chat_template (a template using the model's own tokens) "
            "or use method.name=lora, qlora or full"
        )
    try:
        model = method.apply(model, options)
    except ValueError as exc:  # e.g. peft: target modules not found in the model
        raise TunelabError(f"method {config.method.name}: {exc}") from None
    checkpointed = limit_checkpointing(model, checkpointed)
    params = trainable_parameters(model)
    if any(p.dtype == torch.float16 for p in params.values()):
        raise TunelabError(
            "model.dtype: float16 weights cannot be trained directly (AdamW underflows and the run turns to NaN); "
            "load float32 (model.dtype=float32) and use train.precision=fp16 or bf16 for mixed precision"
        )
    return model, method, params, checkpointed


def _restore(checkpoint: Path | None, params, optimizer, total: int, run_dir: Path, resume: bool,
             console) -> tuple[int, dict | None, float]:
    """Load the checkpoint to resume from; returns (its step, the fp16 grad-scaler state if any, seconds of
    optimizer steps spent up to it)."""
    if checkpoint is None:
        if resume:
            console.print(f"No checkpoint in {run_dir} yet: starting again from step 0.")
        return 0, None, 0.0
    state = load_checkpoint(checkpoint, params, optimizer)
    if state["step"] > total:
        raise TunelabError(f"--resume: the newest checkpoint is at step {state['step']}, beyond this config's {total} steps; "
                           "raise train.max_steps/train.epochs or start a new run")
    console.print(f"Resuming from {checkpoint} (step {state['step']}).")
    return state["step"], state.get("grad_scaler"), state.get("train_seconds", 0.0)


def _eval_summary(report: dict) -> dict:
    """The headline numbers of eval.json, for the manifest."""
    summary = {f"{k}_score": v["score"] for k, v in report.get("baselines", {}).items()}
    if "tuned" in report:
        summary["tuned_score"] = report["tuned"]["score"]
    if "forgetting" in report:
        summary["probe_retention"] = report["forgetting"]["retention"]
        summary["probe_lost"] = [item["id"] for item in report["forgetting"]["lost"]]
    return summary


def _hashed_inputs(config: RunConfig) -> list[str]:
    """Files whose content decides the training result: the data, and a chat template given as a file."""
    files = config.data.train_files() + config.data.eval_files()
    if Path(config.data.chat_template).is_file():
        files.append(config.data.chat_template)
    return files


def _train_loop(config, model, optimizer, params, data, accelerator, run_dir, start_step, seconds_spent, tokenizer, console):
    """The optimisation loop; returns (last logged train loss, last validation metrics, input tokens processed,
    steps done). ``train.max_seconds`` ends it early: time is counted over optimizer steps only (not
    validation or checkpoints), summed over resumes (``seconds_spent`` so far)."""
    cfg = config.train
    total = _total_steps(config, len(data.train))
    per_epoch = _steps_per_epoch(config, len(data.train))
    warmup = warmup_steps(total, cfg.warmup_ratio)
    save_every = cfg.save_every or per_epoch
    eval_every = cfg.eval_every or save_every
    log_every = cfg.log_every or (10 if accelerator.device.type == "cuda" else 1)
    pad_id = tokenizer.pad_token_id
    make_batch = _packed_batches(accelerator.unwrap_model(model)) if cfg.packing else collate
    log = MetricsLog(run_dir, resume_step=start_step)
    last_loss, last_eval, order_epoch, order = None, None, -1, []
    tokens_seen, tokens_total, window_start = 0, 0, time.time()
    model.train()
    with training_progress(console) as progress:
        task = progress.add_task("train", total=total, completed=start_step, loss="-", lr="-", tok_s="-")
        for step in range(start_step, total):
            epoch, index = divmod(step, per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_batches(len(data.train), cfg.batch_size, cfg.seed, epoch), epoch
            step_started = _clock()
            micro_ids = order[index * cfg.grad_accum : (index + 1) * cfg.grad_accum]
            micro = [make_batch([data.train[i] for i in ids], pad_id) for ids in micro_ids]
            step_tokens = sum(trained_token_count(b["labels"]) for b in micro)
            lr = lr_at(_schedule_step(step, total, seconds_spent, cfg.max_seconds), base_lr=cfg.lr, total_steps=total,
                       warmup=warmup, kind=cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = _accumulate_gradients(model, micro, step_tokens, accelerator)
            step_input_tokens = sum(len(data.train[i].input_ids) for ids in micro_ids for i in ids)  # no padding
            tokens_seen += step_input_tokens
            tokens_total += step_input_tokens
            grad_norm = accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm) if cfg.max_grad_norm else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds_spent += _clock() - step_started
            done = step + 1
            last = done == total or (cfg.max_seconds is not None and seconds_spent >= cfg.max_seconds)
            if done % log_every == 0 or last:
                elapsed = max(time.time() - window_start, 1e-9)
                last_loss = _require_finite(loss_sum, done) / max(step_tokens, 1)
                record = {"step": done, "epoch": round(done / per_epoch, 4), "loss": last_loss, "lr": lr,
                          "tokens_per_s": tokens_seen / elapsed, "trained_tokens": step_tokens}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                log.log(record)
                progress.update(task, completed=done, loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_seen / elapsed:,.0f}")
                if not progress.console.is_terminal and (done % max(1, total // 10) == 0 or last):
                    progress.console.print(f"step {done}/{total}  loss {last_loss:.4f}  lr {lr:.2e}  {tokens_seen / elapsed:,.0f} tok/s")
                tokens_seen, window_start = 0, time.time()
            if data.eval and (done % eval_every == 0 or last):
                last_eval = validation_loss(model, data.eval, batch_size=cfg.batch_size, pad_id=pad_id,
                                            device=accelerator.device, autocast=accelerator.autocast)
                log.log({"step": done, **last_eval})
                progress.console.print(f"step {done}: eval_loss {last_eval['eval_loss']:.4f}  ppl {last_eval['eval_ppl']:.2f}")
            if done % save_every == 0 or last:
                _require_finite(loss_sum, done)  # never checkpoint a diverged model
                extra = {"epoch": epoch, "train_seconds": seconds_spent,
                         **({"grad_scaler": accelerator.scaler.state_dict()} if accelerator.scaler else {})}
                save_checkpoint(run_dir / "checkpoints", done, params, optimizer, extra, cfg.keep_last)
            _crash_for_tests(done)
            if last:
                break
    log.close()
    return last_loss, last_eval, tokens_total, done if total > start_step else start_step


_clock = time.monotonic  # times optimizer steps for train.max_seconds (a test replaces it)


def _schedule_step(step: int, total: int, seconds_spent: float, max_seconds: float | None) -> float:
    """Where the learning-rate schedule stands: the step, or further on when the time budget is further spent."""
    if max_seconds is None:
        return step
    return max(step, min(1.0, seconds_spent / max_seconds) * total)


def _accumulate_gradients(model, micro_batches: list[dict], step_tokens: int, accelerator) -> torch.Tensor:
    """Forward/backward every micro-batch of one optimizer step; return the summed token loss (detached).

    Each micro-batch's summed loss is divided by the trained-token count of the whole step, so the
    accumulated gradient equals that of one big batch.
    """
    loss_sum = torch.zeros((), device=accelerator.device)
    for batch in micro_batches:
        batch = to_device(batch, accelerator.device)
        with accelerator.autocast():
            loss = summed_loss_of_batch(model, batch)
        accelerator.backward(loss / max(step_tokens, 1))
        loss_sum += loss.detach()
    return loss_sum


def _packed_batches(model):
    """Collate function for train.packing: rows no longer than the micro-batch's longest example (so
    packing never costs more than padding), one row for flash-attention's variable-length kernels."""
    from tunelab.data.packing import packed_micro_batch, row_budget

    attention = getattr(model.config, "_attn_implementation", "sdpa")
    return lambda examples, pad_id: packed_micro_batch(examples, pad_id, row_budget(examples, attention))


def _require_finite(loss_sum: torch.Tensor, step: int) -> float:
    value = float(loss_sum)
    if not math.isfinite(value):
        raise TunelabError(
            f"step {step}: the loss is {value}; training diverged and was stopped (no artifact written). "
            "Lower train.lr, keep train.max_grad_norm set, or train in float32 (model.dtype=float32, train.precision=fp32)."
        )
    return value


def _crash_for_tests(step: int) -> None:
    """``TUNELAB_TEST_SIGKILL_AT_STEP=N`` kills the process with SIGKILL after step N (resume tests)."""
    if os.environ.get("TUNELAB_TEST_SIGKILL_AT_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def _steps_per_epoch(config: RunConfig, n_examples: int) -> int:
    micro_batches = math.ceil(n_examples / config.train.batch_size)
    return math.ceil(micro_batches / config.train.grad_accum)


def _total_steps(config: RunConfig, n_examples: int) -> int:
    if config.train.max_steps:
        return config.train.max_steps
    return max(1, math.ceil(config.train.epochs * _steps_per_epoch(config, n_examples)))


def _accelerator(precision: str):
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not cuda:
        raise TunelabError("train.precision: fp16 needs a CUDA GPU; use fp32 (or bf16) on CPU")
    return Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision))
