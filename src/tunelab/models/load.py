"""Resolve ``model.path`` (alias, local dir, .gguf file, hub id) and load model and tokenizer.

Loading is safetensors-only and never runs remote code unless ``model.trust_remote_code`` is set.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.errors import ModelError
from tunelab.models.embedded import EMBEDDED, ensure_embedded, ensure_gguf_converted

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(spec: str) -> str:
    """Turn ``model.path`` into something ``from_pretrained`` can load (a local dir or a hub id).

    Raises:
        ModelError: the spec is none of the accepted kinds, or the file/dir is missing or incomplete.
    """
    if spec in EMBEDDED:
        return str(ensure_embedded(spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.path: GGUF file {spec!r} not found")
        return str(ensure_gguf_converted(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.path: {spec!r} is a directory without config.json; point it at a Hugging Face model directory")
        return str(path.resolve())
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec  # a hub id; from_pretrained reports if it cannot be fetched
    raise ModelError(
        f"model.path: {spec!r} is not an embedded alias, a local model directory, a .gguf file or a hub id. "
        f"Embedded aliases: {', '.join(EMBEDDED)} (see `tunelab models`)."
    )


def _hub_error(path: str, exc: Exception) -> ModelError:
    return ModelError(
        f"could not load model {path!r}: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
        "  If this is a hub id, this machine may be offline: download the model elsewhere and set model.path to its "
        "directory, or use an embedded alias (`tunelab models`)."
    )


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Load a (fast) tokenizer from a resolved path."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _hub_error(path, exc) from None


def torch_dtype(name: str) -> torch.dtype:
    """``model.dtype`` to a torch dtype; ``auto`` keeps float32 master weights (autocast does the rest)."""
    return _DTYPES.get(name, torch.float32)


def load_model(path: str, dtype: str = "auto", trust_remote_code: bool = False, **extra):
    """Load a causal LM from a resolved path, safetensors only; ``extra`` goes to ``from_pretrained``
    (a tuning method's quantization config and device map)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from tunelab.models.vision import is_vision_config

    try:
        vision = is_vision_config(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
        auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM  # a VLM keeps its vision tower
        model = auto.from_pretrained(
            path, dtype=torch_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, ValueError) as exc:
        raise _hub_error(path, exc) from None
    if "quantization_config" in extra:
        keep_bnb_weights_trainable(model)
    return model


def keep_bnb_weights_trainable(model) -> None:
    """Keep every bitsandbytes 4-bit layer of ``model`` on its differentiable kernel (idempotent).

    On CPUs with AVX512-BF16, bitsandbytes (0.45 to at least 0.50) repacks a 4-bit weight in place on the
    first forward in eval mode without grad (an evaluation) and from then on computes the layer with an
    inference kernel that has no backward, in training too: gradients stop at such layers (silently, with
    a PyTorch warning only), and a layer with a bias crashes (``a view of a leaf Variable ... in-place``).
    Repacking also needs ``out_features`` divisible by 32 and ``in_features`` by the block size, and crashes
    otherwise. Since one loaded model is both evaluated and trained, the repacking is switched off for every
    layer; a layer found repacked already is unpacked with bitsandbytes' own inverse (which re-quantizes the
    block scales it had rounded to bfloat16, so such a layer is within that rounding of a fresh load).
    """
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
