"""``plan()``: resolves the device, shape, method and batch of a config, estimates its memory and time on it
and on every catalog GPU, and suggests changes when it does not fit."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from tunelab.config.schema import RunConfig, updated
from tunelab.errors import TunelabError
from tunelab.planning.data import DataProfile, count_examples
from tunelab.planning.devices import CPU_MFU, GPU_MFU, GPUS, Device, GiB, resolve_device
from tunelab.planning.memory import MemoryEstimate, PlannedBatch, MemoryEnv, VisionCost, estimate_memory
from tunelab.planning.method import PlannedMethod, planned_method
from tunelab.planning.recipes import completion_positions, generation_phase, rows_per_example, teacher_bytes
from tunelab.planning.shape import ModelShape, load_shape
from tunelab.planning.timing import TimeEstimate, flops_per_token
from tunelab.planning.vision import VisionPlan, describe, load_vision, trained_params, vision_cost, vision_flops
from tunelab.training.schedule import total_steps


@dataclass
class Plan:
    """Everything ``tunelab plan`` predicts for one config on one device."""

    model: str
    shape: ModelShape
    method: str
    device: Device
    precision: str  # resolved: fp32 / bf16 / fp16
    weight_bytes: int  # per base parameter (model.dtype)
    batch: tuple[int, int]  # (rows, tokens per row) of the largest micro-batch
    checkpointed_blocks: int  # decoder blocks that recompute their activations (train.gradient_checkpointing)
    total_params: int
    trainable_params: int
    memory: MemoryEstimate
    time: TimeEstimate
    fits: bool
    tight: bool  # fits with under 5 % to spare: allocator fragmentation may tip it over
    fits_by_gpu: dict[str, bool]
    time_by_gpu: dict[str, float | None]
    suggestions: list[str]
    assumptions: list[str]
    recipe_note: str | None = None  # what the recipe adds (both sides of pairs, a teacher)
    active_params: int | None = None  # MoE: parameters one token passes through (None for a dense model)
    vision_notes: list[str] | None = None  # a VLM: its tower, projector and image tokens as counted (planning.vision)


@dataclass(frozen=True)
class _Knobs:
    tokens_per_epoch: int | None = None
    data: DataProfile | None = None
    completion_fraction: float = 1.0
    mfu: float | None = None
    kernels: Literal["hf", "liger"] = "hf"
    held_logits: bool = False
    padded: bool = True
    vision: VisionPlan | None = None  # a VLM's image side (None: a text model)


def _precision(config: RunConfig, device: Device) -> str:
    """``train.precision`` resolved as the training loop resolves it."""
    precision = config.train.precision
    if precision == "auto":
        return "bf16" if device.kind == "gpu" else "fp32"
    if precision == "fp16" and device.kind == "cpu":
        raise TunelabError("train.precision: fp16 needs a CUDA GPU; use fp32 (or bf16) on CPU")
    return precision


# ``train.gradient_checkpointing: auto`` checkpoints the fewest blocks that bring the plan under this share
# of the device's memory (the plan calls a fit above it "tight").
AUTO_CHECKPOINTING_SHARE = 0.95


def checkpointed_blocks(config: RunConfig, shape: ModelShape, device: Device, data: DataProfile | None = None) -> int:
    """How many decoder blocks ``train.gradient_checkpointing`` checkpoints on ``device``: all (true), none
    (false, or a method that cannot be checkpointed), or for ``auto`` the fewest that make the planned peak
    fit in ``AUTO_CHECKPOINTING_SHARE`` of the device's memory (all of them if nothing fits); a VLM's tower and
    projector counted (``planning.vision``)."""
    return _resolve_blocks(config, shape, device, _Knobs(data=data, vision=load_vision(config)))


def _resolve_blocks(config: RunConfig, shape: ModelShape, device: Device, knobs: _Knobs) -> int:
    """:func:`checkpointed_blocks` under the plan's knobs (the same loop model as its memory estimate)."""
    from tunelab.methods import get_method

    setting = config.train.gradient_checkpointing
    if setting is not True and setting != "auto":
        return 0
    if "gradient_checkpointing" in get_method(config.method.name).incompatible:
        return 0
    if setting is True:
        return shape.layers
    budget = AUTO_CHECKPOINTING_SHARE * device.memory_bytes

    def fits(blocks: int) -> bool:
        return _memory_of(config, shape, device, knobs, blocks)[0].total <= budget

    if fits(0):
        return 0
    if not fits(shape.layers):
        return shape.layers  # the most checkpointing can do; the plan's suggestions say what else to change
    low, high = 0, shape.layers  # fits(low) is false, fits(high) is true; the peak falls as blocks grow
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def _memory_of(config: RunConfig, shape: ModelShape, device: Device, knobs: _Knobs,
               blocks: int | None = None) -> tuple[MemoryEstimate, PlannedMethod, PlannedBatch]:
    """The memory estimate with ``blocks`` checkpointed blocks (default: as the config resolves on ``device``)."""
    from tunelab.models.load import torch_dtype

    precision, w, m = _precision(config, device), torch_dtype(config.model.dtype).itemsize, planned_method(config, shape)
    if m.extra_in_weight_dtype:
        m.extra_bytes = w
    if knobs.vision is not None and knobs.vision.train_vision != "none":
        m.input_grad = True  # the image features the trained projector makes enter the language model with a gradient
    t, d, train = config.data.max_length + completion_positions(config), knobs.data, config.train
    if d is not None:
        rows, seq = d.peak_rows, d.peak_seq
        logit_rows = rows * (seq - 1) if m.full_logits else d.peak_trained
    else:
        rows, seq = (1, train.batch_size * t) if train.packing else (train.batch_size, t)
        logit_rows = train.batch_size * (t - 1) * (1.0 if m.full_logits else knobs.completion_fraction)
    per = rows_per_example(config)  # a pair recipe's micro-batch holds both sides of every pair
    batch = PlannedBatch(rows * per, seq, logit_rows * per, knobs.padded or train.packing or m.prefix > 0)
    mixed = precision in ("bf16", "fp16")
    base = 4 if m.quant_bits else w
    liger = knobs.kernels == "liger" or config.train.kernels == "liger"
    env = MemoryEnv(w=base, c=2 if mixed else base, autocast=mixed, gpu=device.kind == "gpu", liger=liger,
               gqa_repeat=batch.mask, quant_bits=m.quant_bits, kv_scale=(seq + m.prefix) / seq,
               mask_kv=seq + m.virtual_tokens + m.prefix if batch.mask else 0)
    if blocks is None:
        blocks = _resolve_blocks(config, shape, device, knobs)
    cost = vision_cost(knobs.vision, m, w=w, c=env.c, rows=batch.rows) if knobs.vision else VisionCost()
    memory = estimate_memory(shape, m, env, batch, checkpointing=blocks, grad_accum=train.grad_accum,
                             held_logits=knobs.held_logits, vision=cost)
    teacher, _ = teacher_bytes(config, w, batch.logit_rows)
    if teacher:  # resident through every phase of the step
        memory = replace(memory, weights=memory.weights + teacher, phases={k: v + teacher for k, v in memory.phases.items()})
    return _with_generation(config, shape, memory, env.c), m, batch


def _with_generation(config: RunConfig, shape: ModelShape, memory: MemoryEstimate, kv_bytes: int) -> MemoryEstimate:
    """GRPO's sampling phase added to the phases, and made the peak when it is larger than training's."""
    resident = memory.weights + memory.trainable_weights + memory.optimizer_states
    generation, kv, logits, _ = generation_phase(config, shape, resident, kv_bytes)
    if not generation:
        return memory
    phases = {**memory.phases, "generation": generation}
    if generation <= memory.tensors:
        return replace(memory, phases=phases)
    return replace(memory, gradients=0, activations=0, weight_copies=0, attention_mask=0, logits=logits, workspace=kv,
                   peak_phase="generation", phases=phases)


def plan(config: RunConfig, gpu: str | None = None, *, tokens_per_epoch: int | None = None, data: DataProfile | None = None,
         completion_fraction: float = 1.0, mfu: float | None = None, kernels: Literal["hf", "liger"] = "hf",
         held_logits: bool = False, padded: bool = True) -> Plan:
    """Predict the peak memory and the training time of ``config`` on ``gpu``, from the model's config.json.

    Args:
        config: The run configuration.
        gpu: A name from :data:`GPUS`, ``cpu``, or ``current``/None (this machine).
        tokens_per_epoch: Tokens one epoch processes (padding included), if known.
        data: A ``tunelab.stages.profile.profile_data`` result: its largest micro-batch sets the memory, its tokens the time.
        completion_fraction: Share of positions that are trained (only they get logits); 1.0 = worst case.
        mfu: Model FLOPs utilisation to assume (default 0.35 on a GPU, ``CPU_MFU`` on CPU).
        kernels: ``liger`` models liger-kernel's RMSNorm/SwiGLU/RoPE and fused linear cross-entropy.
        held_logits: Model a plain HF loop instead of tunelab's: the output logits are kept through backward
            (``out = model(..., labels=...); out.loss.backward()``) and the loss is never chunked.
        padded: Rows carry a padding mask (sdpa then expands k/v to all heads); False for equal-length rows.

    Raises:
        TunelabError: unknown GPU, unreadable model config, a method the planner does not model.
    """
    from tunelab.models.load import torch_dtype

    if not 0 < completion_fraction <= 1:
        raise TunelabError("completion_fraction must be in (0, 1]: the share of positions whose next token is trained")
    device, shape = resolve_device(gpu), load_shape(config)
    knobs = _Knobs(tokens_per_epoch, data, completion_fraction, mfu, kernels, held_logits, padded, load_vision(config))
    blocks = _resolve_blocks(config, shape, device, knobs)
    memory, m, batch = _memory_of(config, shape, device, knobs, blocks)
    table = shape.parameter_table()
    examples = data.examples if data else count_examples(config)
    time_on = {name: _estimate_time(config, shape, m, g, knobs, examples) for name, g in GPUS.items()}
    gpu_memory = memory if device.kind == "gpu" else _memory_of(config, shape, GPUS["h100-80gb"], knobs)[0]
    fits = memory.total <= device.memory_bytes
    result = Plan(
        config.model.path, shape, config.method.name, device, _precision(config, device),
        torch_dtype(config.model.dtype).itemsize,
        (batch.rows, batch.seq + m.virtual_tokens), blocks,
        sum(table.values()) + m.extra, sum(n for k, n in table.items() if k in m.trainable) + m.extra,
        memory, _estimate_time(config, shape, m, device, knobs, examples, blocks), fits,
        fits and memory.total > 0.95 * device.memory_bytes,
        {name: gpu_memory.total <= g.memory_bytes for name, g in GPUS.items()},
        {name: t.seconds for name, t in time_on.items()}, [], [],
    )
    result.active_params = shape.active_parameters() + m.extra if shape.experts else None
    _count_vision(result, knobs.vision, m)
    if not fits or result.tight:
        result.suggestions = _suggest(config, shape, device, knobs)
    result.recipe_note = _recipe_note(config, w=torch_dtype(config.model.dtype).itemsize, logit_rows=batch.logit_rows, shape=shape)
    result.assumptions = _assumptions(result, knobs, m)
    return result


def _count_vision(result: Plan, vision: VisionPlan | None, m: PlannedMethod) -> None:
    """A VLM's tower and projector in the plan's parameter counts (trainable: what train_vision trains) and notes."""
    if vision is None:
        return
    added, trained = trained_params(vision, m)
    result.total_params += sum(vision.shape.params.values()) + added
    result.trainable_params += trained
    result.vision_notes = describe(vision, m)


def _estimate_time(config: RunConfig, shape: ModelShape, m: PlannedMethod, device: Device, knobs: _Knobs,
                   examples: int | None, blocks: int | None = None) -> TimeEstimate:
    """``blocks``: checkpointed blocks on ``device``, if already resolved."""
    train, d = config.train, knobs.data
    if knobs.tokens_per_epoch:
        tokens, source = knobs.tokens_per_epoch, "given"
    elif d:
        tokens, source = d.processed_tokens, "tokenised data (padded micro-batches)"
    elif examples is not None:
        tokens, source = examples * config.data.max_length, "examples x max_length (an upper bound: most examples are shorter)"
    else:
        tokens, source = None, "unknown: data.train could not be read (pass the tokens per epoch)"
    steps = None
    if examples:
        steps = total_steps(examples, batch_size=train.batch_size, grad_accum=train.grad_accum,
                            epochs=train.epochs, max_steps=train.max_steps)
    row = tokens / examples if tokens and examples else config.data.max_length
    if train.max_steps:
        total = train.max_steps * train.grad_accum * train.batch_size * row
    else:
        total = tokens * train.epochs if tokens else None
    if total and m.virtual_tokens:  # every row also runs the soft prompt
        total *= (row + m.virtual_tokens) / row
    if total:  # a pair recipe runs both sides of every example
        total *= rows_per_example(config)
    completion = d.trained_tokens / max(d.tokens, 1) if d else knobs.completion_fraction
    if blocks is None:
        blocks = _resolve_blocks(config, shape, device, knobs)
    flops = flops_per_token(shape, m, row, completion, blocks)
    if knobs.vision is not None:  # the tower's and projector's matmuls, per example, spread over its row
        flops += vision_flops(knobs.vision) / row
    peak = device.peak_flops(_precision(config, device))
    mfu = knobs.mfu or (GPU_MFU if device.kind == "gpu" else CPU_MFU)
    seconds = total * flops / (peak * mfu) if total and peak else None
    return TimeEstimate(flops, tokens, source, total, steps, peak, mfu, seconds)


def _set_keys(section: str, **values):
    """A function giving a copy of a (frozen) config with ``values`` set in ``section``."""
    return lambda cfg: updated(cfg, **{section: updated(getattr(cfg, section), **values)})


def _suggest(config: RunConfig, shape: ModelShape, device: Device, knobs: _Knobs) -> list[str]:
    """Changes that lower the peak, tried in order and kept when they help, until the run fits."""
    from tunelab.config.sections import MethodConfig, section_class
    from tunelab.methods import get_method

    limit, out = device.memory_bytes, []
    memory, m, _ = _memory_of(config, shape, device, knobs)
    current, best = config, memory.total

    def attempt(change: str, derive) -> bool:
        """Keep ``derive``'s copy of the current config if it lowers the peak; True once it fits."""
        nonlocal current, best
        candidate = derive(current)
        total = _memory_of(candidate, shape, device, knobs)[0].total
        if total < best:
            current, best = candidate, total
            out.append(f"{'+ ' if out else ''}{change}: {total / GiB:.1f} GiB ({'fits' if total <= limit else 'still too big'})")
        return best <= 0.95 * limit

    checkpointable = "gradient_checkpointing" not in get_method(config.method.name).incompatible
    if config.train.gradient_checkpointing is not True and checkpointable:
        if attempt("train.gradient_checkpointing=true", _set_keys("train", gradient_checkpointing=True)):
            return out
    # a quantised base is already smaller than a bf16 one
    if m.frozen_base and not m.quant_bits and config.model.dtype in ("auto", "float32") and device.kind == "gpu":
        if attempt("model.dtype=bfloat16 (the frozen base in bf16; trained weights stay float32)",
                   _set_keys("model", dtype="bfloat16")):
            return out
    if m.cheaper_variant:
        variant, saves = m.cheaper_variant
        cheaper = section_class(get_method(variant).options_class, MethodConfig)
        if attempt(f"method.name={variant} ({saves})",
                   lambda cfg: updated(cfg, method=cheaper.model_validate({**cfg.method.options(), "name": variant}))):
            return out
    while current.train.batch_size > 1:
        batch = current.train.batch_size
        half = batch // 2 if batch % 2 == 0 else 1
        accum = current.train.grad_accum * batch // half
        if attempt(f"train.batch_size={half} train.grad_accum={accum} (same effective batch)",
                   _set_keys("train", batch_size=half, grad_accum=accum)):
            return out
        if current.train.batch_size == batch:  # the peak does not depend on the batch (optimizer step)
            break
    while current.data.max_length > 256:
        length = current.data.max_length // 2
        if attempt(f"data.max_length={length} (longer examples are truncated or dropped)", _set_keys("data", max_length=length)):
            return out
        if current.data.max_length != length:
            break
    return out


def _recipe_note(config: RunConfig, *, w: int, logit_rows: float, shape: ModelShape | None = None) -> str | None:
    teacher_note = teacher_bytes(config, w, logit_rows)[1]
    if teacher_note:
        return teacher_note
    if config.recipe.needs.generation_rows and shape is not None:
        return generation_phase(config, shape, 0, w)[3]
    if rows_per_example(config) > 1:
        return (f"recipe {config.recipe.name}: both sides of each pair in one forward ({rows_per_example(config)} rows per "
                "example); the reference model costs no weights (method switched off, or precomputed log-probabilities)")
    return None


def _assumptions(p: Plan, knobs: _Knobs, m: PlannedMethod) -> list[str]:
    gpu = p.device.kind == "gpu"
    overhead = "CUDA context + allocator slack" if gpu else "the Python process; glibc may hold more"
    notes = [f"runtime overhead {p.memory.overhead / GiB:.1f} GiB ({overhead})",
             f"largest micro-batch {p.batch[0]} x {p.batch[1]} tokens"
             + ("" if knobs.data else " (worst case: every row max_length long)")]
    if m.full_logits:
        notes.append("logits at every position (no trained-position shortcut for this method or model)")
    elif not knobs.data:
        notes.append(f"logits at {knobs.completion_fraction:.0%} of positions "
                     "(the completion fraction; 100% is the worst case)")
    if p.shape.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        notes.append(f"model type {p.shape.model_type!r} approximated by a llama-style block")
    if m.quant_bits:
        notes.append("quantised base: bitsandbytes layout (NF4 blocks of 64, double-quantised scales)")
    if knobs.vision is not None:
        notes.append("image side (tunelab.planning.vision): tower and projector parameters exact (the model built on "
                     "the meta device); when they train, each of their linear layers keeps its input and output per "
                     "image token (tower: per position), no checkpointing in the tower; time: their matmuls, not the "
                     "attention over patches")
    if p.recipe_note:
        notes.append(p.recipe_note)
    if p.time.seconds is not None:
        peak = (p.time.peak_flops or 0) / 1e12
        source = "measured matmul peak of the 2-core dev machine" if not gpu else "dense peak"
        notes.append(f"time: {p.time.flops_per_token / 1e9:.3g} GFLOP/token at {peak:.3g} TFLOP/s ({source}) x MFU "
                     f"{p.time.mfu:.2f} (assumed); tokens: {p.time.tokens_source}")
    else:
        why = p.time.tokens_source if p.time.total_tokens is None else "no FLOP/s figure for this device"
        notes.append(f"time unknown: {why}")
    return notes
