"""A run's LoRA adapter alone as a GGUF adapter file, for llama.cpp's ``--lora`` on a GGUF of the base.

Hand-written for the same reason as ``gguf_model`` (no library writes PEFT adapters as GGUF from Python).
Each adapted weight ``W`` gets two tensors, ``<gguf name of W>.lora_a`` (r, in) and ``.lora_b`` (out, r),
and the file records ``adapter.lora.alpha``; llama.cpp adds ``alpha / r · B A x``. rsLoRA's ``alpha / √r``
is written as the alpha that gives that scale. ``B``'s rows of a q/k projection are interleaved like the
base weights' (``permute_rotary_rows``) so the update lands on the rows llama.cpp rotates together.
What a GGUF LoRA cannot hold is refused: DoRA's magnitude vectors, trained embedding rows or whole
modules (``modules_to_save``), LoRA on embeddings, per-module ranks or alphas.

The check loads a GGUF of the base (f16, written to a temporary file) with the adapter in llama.cpp and
compares it with the base plus adapter in PEFT, unmerged, as the run was evaluated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.export.formats import register_exporter

_PREFIX = "base_model.model."


def _lora_config(artifact: Path) -> dict[str, Any]:
    config = json.loads((artifact / "adapter_config.json").read_text())
    problems = []
    if config.get("use_dora"):
        problems.append("DoRA (its magnitude vectors have no GGUF LoRA form)")
    if config.get("modules_to_save") or config.get("trainable_token_indices"):
        problems.append("trained embedding rows or whole modules besides the LoRA factors")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("per-module ranks or alphas")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("trained biases")
    if problems:
        raise TunelabError(f"--format gguf-lora: the adapter in {artifact} uses {', '.join(problems)}, which a GGUF LoRA "
                           "cannot hold; export the merged model with --format gguf instead")
    return config


def lora_tensors(artifact: Path, config: Any) -> list[tuple[str, Any]]:
    """(GGUF tensor name, float32 array) of every LoRA factor in ``artifact``, in llama.cpp's layout.

    Raises:
        TunelabError: A tensor that is not a LoRA factor of a llama weight.
    """
    import gguf
    import torch
    from safetensors.torch import load_file

    state = load_file(str(artifact / "adapter_model.safetensors"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config.num_hidden_layers))
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    out = []
    for key, tensor in sorted(state.items()):
        part = "lora_a" if ".lora_A." in key else "lora_b" if ".lora_B." in key else None
        module = key.removeprefix(_PREFIX).split(".lora_")[0]
        name = names.get_name(module + ".weight", try_suffixes=(".weight",)) if part else None
        if name is None:
            raise TunelabError(f"--format gguf-lora: adapter tensor {key!r} is not a LoRA factor of a llama weight "
                               "(LoRA on embeddings or extra trained modules?); export --format gguf instead")
        array = tensor.to(torch.float32).numpy()
        if part == "lora_b" and module.endswith(("q_proj", "k_proj")):
            from tunelab.export.gguf_model import permute_rotary_rows

            array = permute_rotary_rows(array, heads if module.endswith("q_proj") else kv_heads)
        out.append((f"{name}.{part}", array))
    return out


def write_lora_gguf(path: Path, artifact: Path, model_config: Any, name: str) -> dict[str, Any]:
    """Write the LoRA adapter in ``artifact`` as a GGUF adapter for a model of ``model_config``.

    Returns:
        rank, alpha written, and the number of tensors.
    """
    import gguf

    from tunelab.export.gguf_model import gguf_arch

    arch = gguf_arch(model_config)
    config = _lora_config(artifact)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    written_alpha = alpha * math.sqrt(rank) if config.get("use_rslora") else alpha  # llama.cpp scales by alpha / r
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, written_alpha)
    tensors = lora_tensors(artifact, model_config)
    for tensor_name, array in tensors:
        writer.add_tensor(tensor_name, array.astype("float16"), raw_dtype=gguf.GGMLQuantizationType.F16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"rank": rank, "alpha": alpha, "gguf_alpha": written_alpha, "tensors": len(tensors)}


@register_exporter("gguf-lora", summary="a run's LoRA adapter as a GGUF adapter for llama.cpp's --lora")
def export_lora(source: Any, tmp: Path, quant: str, force: bool, prompts: int, new_tokens: int | None) -> dict[str, Any]:
    """The ``gguf-lora`` export of a LoRA run into ``tmp``: the adapter file, checked on a base GGUF in llama.cpp."""
    from tunelab.evaluation.run import load_for_eval
    from tunelab.export.gguf_model import write_gguf
    from tunelab.export.verify import verify_gguf
    from tunelab.models.load import load_model

    if quant != "f16":
        raise TunelabError(f"--format gguf-lora --quant {quant}: LoRA factors are small and stored in f16; quantize the "
                           "base GGUF instead (tunelab export --format gguf --quant ... of the base model)")
    run = source.run
    loaded = load_for_eval(str(run.path))  # the model as evaluated: base + adapter, unmerged
    base = load_model(run.base_model)  # a second, plain copy: the PEFT-wrapped one has other weight names
    if len(loaded.tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(loaded.tokenizer))
    adapter = tmp / f"{source.name}-lora-f16.gguf"
    info = write_lora_gguf(adapter, run.artifact_dir, base.config, source.name)
    base_gguf = tmp / ".base-f16.gguf"
    write_gguf(base_gguf, base, loaded.tokenizer, "f16", f"{source.name}-base")
    del base
    try:
        verification = verify_gguf(base_gguf, loaded.model, loaded.tokenizer, source, "f16", force, prompts, new_tokens,
                               lora=adapter)
    finally:
        base_gguf.unlink()
    return {"file": adapter.name, "bytes": adapter.stat().st_size, "quant": "f16", "lora": info,
            "base_model": run.base_model, "verification": verification,
            "usage": f"llama-cli -m <base model GGUF> --lora {adapter.name}"}
