"""Write a Hugging Face causal LM as a GGUF file (f16, q8_0 or q4_0) with the ``gguf`` package.

Hand-written because no library converts HF weights to GGUF from Python: the ``gguf`` package gives
the file writer, the key names, the tensor name map (``gguf.TensorNameMap``) and the quantizers
(``gguf.quants``), but which hyperparameters an architecture needs and how its weights must be laid out
for llama.cpp is decided here. Supported: the llama architecture (Llama, SmolLM2, and Mistral models,
which llama.cpp runs as llama). What the layout needs:

- llama.cpp's llama rotary embedding rotates adjacent pairs of a head's dimensions, transformers' rotates
  the first half against the second, so the rows of ``q_proj`` and ``k_proj`` are interleaved per head
  (``permute_rotary_rows``) for the two to compute the same attention.
- A tied output projection is left out: llama.cpp then reuses ``token_embd``.
- Norm vectors stay float32 (llama.cpp computes norms in float32, and they are tiny). For q4_0 the token
  embedding and output projection are q8_0: they are the most error-sensitive matrices (every logit goes
  through the output one) and llama.cpp's own quantizer keeps them at higher precision too. A matrix whose
  rows do not split into 32-value blocks stays f16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.errors import TunelabError
from tunelab.export.gguf_vocab import build_vocab, write_vocab

QUANTS = ("f16", "q8_0", "q4_0")
SUPPORTED_ARCHS = {"llama": "llama", "mistral": "llama"}  # HF model_type -> GGUF architecture


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def gguf_arch(config: Any) -> str:
    """The GGUF architecture for an HF config.

    Raises:
        TunelabError: An architecture tunelab cannot write as GGUF (naming the supported ones).
    """
    model_type = getattr(_text_config(config), "model_type", None)
    if model_type not in SUPPORTED_ARCHS:
        raise TunelabError(f"GGUF export: architecture {model_type!r} is not supported; tunelab writes GGUF for "
                           f"{', '.join(sorted(SUPPORTED_ARCHS))} models (SmolLM2, Llama, Mistral). Export --format hf "
                           "and convert with llama.cpp's convert_hf_to_gguf.py instead")
    return SUPPORTED_ARCHS[model_type]


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in (None, "default"):
        raise TunelabError(f"GGUF export: rope scaling {kind!r} is not supported yet (only unscaled rotary embeddings)")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def write_hparams(writer: Any, config: Any, name: str) -> None:
    """Add the llama architecture's hyperparameters to a ``gguf.GGUFWriter``."""
    config = _text_config(config)
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise TunelabError(f"GGUF export: config {flag}=true is not supported for the llama architecture")
    heads, dim = config.num_attention_heads, head_dim(config)
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(dim)
    writer.add_vocab_size(int(config.vocab_size))
    if dim * heads != config.hidden_size:
        writer.add_key_length(dim)
        writer.add_value_length(dim)


def permute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder the output rows of a q/k projection from HF's half-split rotary layout to adjacent pairs.

    Within each head, HF row ``j`` (first half) and ``j + d/2`` (second half) form rotary pair ``j``; llama.cpp
    expects that pair at rows ``2j`` and ``2j + 1``. Works on (out, in) matrices and (out, r) LoRA B factors.
    """
    out = weight.shape[0]
    half = out // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)  # (H, d/2, 2, ...)


def tensor_type(gguf_name: str, array: np.ndarray, quant: str) -> Any:
    """The GGML type a tensor is stored in under ``quant`` (see the module docstring for the rules)."""
    import gguf

    q = gguf.GGMLQuantizationType
    if array.ndim < 2:
        return q.F32
    wanted = {"f16": q.F16, "q8_0": q.Q8_0, "q4_0": q.Q4_0}[quant]
    if quant == "q4_0" and gguf_name in ("token_embd.weight", "output.weight"):
        wanted = q.Q8_0
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if array.shape[-1] % block == 0 else q.F16


def gguf_tensors(state: dict[str, torch.Tensor], config: Any, arch: str) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in llama.cpp's layout) for every weight of the model, in file order.

    Raises:
        TunelabError: A weight the llama architecture has no GGUF name for.
    """
    import gguf

    config = _text_config(config)
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(arch_enum, int(config.num_hidden_layers))
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = []
    for key, tensor in state.items():
        if tied and key == "lm_head.weight":
            continue
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a buffer computed from rope_theta, not a weight
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TunelabError(f"GGUF export: weight {key!r} has no llama.cpp name for the {arch} architecture; "
                               "the model is not a plain llama-family model")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if key.endswith("q_proj.weight"):
            array = permute_rotary_rows(array, heads)
        elif key.endswith("k_proj.weight"):
            array = permute_rotary_rows(array, kv_heads)
        out.append((name, array))
    return out


def write_gguf(path: Path, model: Any, tokenizer: Any, quant: str, name: str) -> dict[str, int]:
    """Write ``model`` and ``tokenizer`` (with its chat template) to the GGUF file ``path``.

    Args:
        path: File to write (the caller writes into a temporary directory and publishes it atomically).
        model: A ``transformers`` causal LM of a supported architecture.
        tokenizer: Its fast tokenizer, carrying the chat template used in training.
        quant: One of ``QUANTS``.
        name: ``general.name`` of the file.

    Returns:
        How many tensors were stored per GGML type name.

    Raises:
        TunelabError: Unsupported architecture, tokenizer, quantization or weight.
    """
    import gguf
    from gguf.quants import quantize

    if quant not in QUANTS:
        raise TunelabError(f"--quant {quant!r}: use one of {', '.join(QUANTS)}")
    arch = gguf_arch(model.config)
    vocab = build_vocab(tokenizer, int(_text_config(model.config).vocab_size))
    writer = gguf.GGUFWriter(str(path), arch)
    write_hparams(writer, model.config, name)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(writer, vocab, getattr(tokenizer, "chat_template", None))
    counts: dict[str, int] = {}
    for tensor_name, array in gguf_tensors(model.state_dict(), model.config, arch):
        kind = tensor_type(tensor_name, array, quant)
        data = array if kind == gguf.GGMLQuantizationType.F32 else quantize(array, kind)
        writer.add_tensor(tensor_name, data, raw_dtype=kind)
        counts[kind.name] = counts.get(kind.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts
