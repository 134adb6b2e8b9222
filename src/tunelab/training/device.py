"""Where a run computes: the device, the precision, the GPU kernels (``train.kernels``), and how much memory it took.

``train.precision: auto`` is resolved here once (bf16 on a GPU that has it, else fp32) and the resolved
name is what the manifest records and a resume is checked against, so a CPU run resumed on a GPU cannot
silently continue in another precision.

``train.kernels: liger``: liger-kernel's Triton RMSNorm, RoPE and SwiGLU in the model being trained. The
anchors (shared/anchors) measured liger's kernels at 1.35x the tokens/s of stock HF + peft on the 1B shape,
with less than half the activation memory. tunelab applies them to the loaded model instance
(``_apply_liger_kernel_to_instance``) and keeps its own loss: the trained-position, chunked cross-entropy of
``training/loss.py`` already never holds every logit, as liger's fused linear cross-entropy would not. Triton
kernels need a CUDA GPU, so the setting is refused on CPU before anything loads. Not yet measured on a GPU by
tunelab.
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.errors import TunelabError


def device_kind() -> str:
    """``cuda`` when a CUDA GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(precision: str) -> str:
    """``auto``/``fp32``/``bf16``/``fp16`` to what this machine will run: fp32, bf16 or fp16."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not cuda:
        raise TunelabError("train.precision: fp16 needs a CUDA GPU; use fp32 (or bf16) on CPU")
    return precision


def make_accelerator(precision: str, timeout_minutes: float = 60):
    """An ``accelerate.Accelerator`` for the resolved ``precision`` (mixed precision on its autocast). Under a
    distributed launch it creates the process group (NCCL on GPUs, gloo on CPUs: accelerate needs ``cpu=True``
    to take a CPU launch as distributed) with ``timeout_minutes`` for a collective."""
    from accelerate import Accelerator

    from tunelab.training.distributed import launched_world, process_group_kwargs

    mixed = {"fp32": "no"}.get(precision, precision)
    if not launched_world().distributed:
        return Accelerator(mixed_precision=mixed)
    return Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available(),
                       kwargs_handlers=process_group_kwargs(timeout_minutes))


def precision_name(accelerator) -> str:
    """The accelerator's precision as tunelab names it (fp32 where accelerate says 'no')."""
    return {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    """Peak memory of this process: CUDA allocations on a GPU, else the resident set size (whole process lifetime)."""
    if torch.cuda.is_available():
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1), "peak_memory_kind": "cuda_max_allocated"}
    import resource

    return {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "peak_memory_kind": "cpu_peak_rss"}


# Architectures liger patches and tunelab's loss shortcut also covers.
LIGER_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2"})


def check_kernels(kernels: str, device_type: str) -> None:
    """Refuse ``train.kernels`` settings that cannot run here, before anything expensive."""
    if kernels != "liger":
        return
    if device_type != "cuda":
        raise TunelabError("train.kernels: liger needs a CUDA GPU (its kernels are Triton GPU kernels); "
                           "on this machine set train.kernels=none")
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as exc:
        raise TunelabError(f"train.kernels: liger needs liger-kernel ({exc}); pip install liger-kernel, "
                           "or set train.kernels=none") from None


def apply_kernels(model: nn.Module, kernels: str) -> None:
    """Swap in the chosen kernels on ``model`` (the untuned base, before the tuning method wraps it)."""
    if kernels != "liger":
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    model_type = getattr(model.config, "model_type", None)
    if model_type not in LIGER_MODEL_TYPES:
        raise TunelabError(f"train.kernels: liger is supported here for {', '.join(sorted(LIGER_MODEL_TYPES))}, "
                           f"not {model_type!r}; set train.kernels=none")
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
