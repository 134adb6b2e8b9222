"""A run's LoRA adapter alone as a GGUF adapter file, for llama.cpp's ``--lora`` on a GGUF of the base.

Written by llama.cpp's own ``convert_lora_to_gguf.py`` (``tunelab.export.converter``), which maps each LoRA
factor to the tensor name and layout of its base weight for every architecture its converter knows. Before it
runs, what a GGUF LoRA cannot hold is refused with the reason: DoRA's magnitude vectors, trained embedding
rows or whole modules (``modules_to_save``), per-module ranks or alphas, trained biases. llama.cpp scales an
adapter by ``alpha / r``, so an rsLoRA adapter (``alpha / √r``) is handed to the converter with the alpha that
gives its scale.

The check loads a GGUF of the base (f16, converted into the temporary folder: the base weights with the run's
tokenizer and chat template) with the adapter in llama.cpp and compares it with the base plus adapter in
PEFT, unmerged, as the run was evaluated.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.export.formats import register_exporter

def check_lora_config(artifact: Path) -> dict[str, Any]:
    """The adapter's ``adapter_config.json``, refused (TunelabError) when a GGUF LoRA cannot hold the adapter."""
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


def _converter_adapter(artifact: Path, config: dict[str, Any], into: Path) -> tuple[Path, dict[str, Any]]:
    """The adapter as the converter should read it (rsLoRA's alpha rewritten), and the rank and alphas."""
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    written_alpha = alpha * math.sqrt(rank) if config.get("use_rslora") else alpha  # llama.cpp scales by alpha / r
    into.mkdir()
    (into / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": written_alpha, "use_rslora": False}))
    shutil.copyfile(artifact / "adapter_model.safetensors", into / "adapter_model.safetensors")
    return into, {"rank": rank, "alpha": alpha, "gguf_alpha": written_alpha}


def _count_tensors(path: Path) -> int:
    import gguf

    return len(gguf.GGUFReader(path).tensors)


@register_exporter("gguf-lora", summary="a run's LoRA adapter as a GGUF adapter for llama.cpp's --lora")
def export_lora(source: Any, tmp: Path, quant: str, force: bool, prompts: int, new_tokens: int | None) -> dict[str, Any]:
    """The ``gguf-lora`` export of a LoRA run into ``tmp``: the adapter file, checked on a base GGUF in llama.cpp."""
    from tunelab.evaluation.run import load_for_eval
    from tunelab.export.converter import convert_hf, convert_lora
    from tunelab.export.verify import verify_gguf
    from tunelab.models.load import load_model

    if quant != "f16":
        raise TunelabError(f"--format gguf-lora --quant {quant}: LoRA factors are small and stored in f16; quantize the "
                           "base GGUF instead (tunelab export --format gguf --quant ... of the base model)")
    run = source.run
    config = check_lora_config(run.artifact_dir)
    loaded = load_for_eval(str(run.path))  # the model as evaluated: base + adapter, unmerged
    base = load_model(run.base_model)  # a second, plain copy: the PEFT-wrapped one has other weight names
    if len(loaded.tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(loaded.tokenizer))
    base_dir = tmp / ".base-hf"
    base.save_pretrained(base_dir, safe_serialization=True)
    loaded.tokenizer.save_pretrained(base_dir)  # the run's tokenizer and chat template, as the base GGUF should hold
    del base
    adapter_dir, info = _converter_adapter(run.artifact_dir, config, tmp / ".adapter")
    adapter = tmp / f"{source.name}-lora-f16.gguf"
    base_gguf = tmp / ".base-f16.gguf"
    try:
        convert_lora(adapter_dir, base_dir, adapter)
        info["tensors"] = _count_tensors(adapter)
        convert_hf(base_dir, base_gguf, "f16", f"{source.name}-base")
        verification = verify_gguf(base_gguf, loaded.model, loaded.tokenizer, source, "f16", force, prompts, new_tokens,
                                   lora=adapter)
    finally:
        base_gguf.unlink(missing_ok=True)
        shutil.rmtree(base_dir, ignore_errors=True)
        shutil.rmtree(adapter_dir, ignore_errors=True)
    return {"file": adapter.name, "bytes": adapter.stat().st_size, "quant": "f16", "lora": info,
            "base_model": run.base_model, "verification": verification,
            "usage": f"llama-cli -m <base model GGUF> --lora {adapter.name}"}
