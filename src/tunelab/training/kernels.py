"""``train.kernels: liger``: liger-kernel's Triton RMSNorm, RoPE and SwiGLU in the model being trained.

The anchors (shared/anchors) measured liger's kernels at 1.35x the tokens/s of stock HF + peft on the
1B shape, with less than half the activation memory. tunelab applies them to the loaded model instance
(``_apply_liger_kernel_to_instance``) and keeps its own loss: the trained-position, chunked
cross-entropy of ``training/loss.py`` already never holds every logit, as liger's fused linear
cross-entropy would not. Triton kernels need a CUDA GPU, so the setting is refused on CPU before
anything loads. Not yet measured on a GPU by tunelab (no GPU has been lent to this project so far).
"""

from __future__ import annotations

from torch import nn

from tunelab.errors import TunelabError

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
