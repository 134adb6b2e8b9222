"""``export_model``: a run or model written as HF, GGUF or a GGUF LoRA, checked in llama.cpp before it is published.

The output folder appears complete (model file, ``Modelfile``, ``export_report.json``, ``README.md``) or
not at all: everything is written into a temporary folder beside it and renamed into place
(``tunelab.atomic.atomic_dir``), so a failed check, a crash or a full disk leaves nothing half-written.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from tunelab.atomic import atomic_dir, check_replaceable
from tunelab.errors import TunelabError
from tunelab.export.checks import THRESHOLDS
from tunelab.export.formats import EXPORTERS, register_exporter
from tunelab.export.source import REPORT_FILE, Source, open_source
from tunelab.export.verify import verify_gguf


def default_out(source: Source, fmt: str, quant: str) -> Path:
    """``<source>-gguf-f16`` (or ``-hf``, ``-gguf-lora-f16``) beside the source."""
    suffix = fmt if fmt == "hf" else f"{fmt}-{quant}"
    return source.path.resolve().parent / f"{source.name}-{suffix}"


def _check_out(source: Source, out: Path) -> None:
    check_replaceable(out, source.path, REPORT_FILE, "export", str(source.path))


def _load_hf(directory: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, use_safetensors=True)
    return model.eval(), AutoTokenizer.from_pretrained(directory)


def _hf_model_dir(source: Source, tmp: Path, prompts: int) -> tuple[Path, dict[str, Any] | None]:
    """A plain HF directory of the source: the verified merge of a run (inside ``tmp``), or the model dir itself."""
    if source.run is None:
        return source.path, None
    from tunelab.merging import merge_run

    merged = tmp / "hf"
    report = merge_run(source.run.path, merged, prompts=prompts)  # refuses a merge that does not reproduce the run
    return merged, report


def _gguf_name(source: Source, quant: str) -> str:
    return f"{source.name}-{quant}.gguf"


def export_model(path: str | Path, fmt: str = "gguf", quant: str = "f16", out: str | Path | None = None, *,
                 force: bool = False, prompts: int = 8, new_tokens: int | None = None) -> dict[str, Any]:
    """Export a run (merged) or HF model directory, verified, into a new folder.

    Args:
        path: A finished tunelab run directory or a Hugging Face model directory.
        fmt: ``hf`` (the merged model as safetensors), ``gguf`` (one GGUF file plus an Ollama Modelfile) or
            ``gguf-lora`` (a run's LoRA adapter as a GGUF adapter for llama.cpp's ``--lora``).
        quant: ``f16``, ``q8_0`` or ``q4_0`` (GGUF formats).
        out: Folder to write; default beside the source (see :func:`default_out`).
        force: Publish even when a check fails (recorded in the report), or without llama.cpp to check with.
        prompts: Held prompts to check on.
        new_tokens: Greedy tokens generated per prompt; default the run's ``eval.max_new_tokens`` when the
            prompts are its eval examples (so the task score is the run's own), else 32.

    Returns:
        The export report, also written to ``out/export_report.json``.

    Raises:
        TunelabError: Bad input (see :func:`tunelab.export.source.open_source`), an unsupported architecture or
            tokenizer, or a failed check without ``force``; nothing is written then.
    """
    exporter = EXPORTERS.find(fmt)
    if exporter is None:
        raise TunelabError(f"--format {fmt!r}: use one of {', '.join(EXPORTERS.names())}")
    if quant not in THRESHOLDS:
        raise TunelabError(f"--quant {quant!r}: use one of {', '.join(THRESHOLDS)}")
    started = time.time()
    source = open_source(path, fmt)
    target = Path(out) if out is not None else default_out(source, fmt, quant)
    _check_out(source, target)
    with atomic_dir(target) as tmp:
        report = exporter(source, tmp, quant, force, prompts, new_tokens)
        report.update(source=str(source.path), output=str(target), format=fmt, seconds=round(time.time() - started, 2))
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for item in tmp.iterdir():
            item.chmod(0o644)
    return report


@register_exporter("hf", summary="the merged model as safetensors")
def _export_hf(source: Source, tmp: Path, quant: str, force: bool, prompts: int, new_tokens: int | None) -> dict[str, Any]:
    """The merged run (its merge_report.json and model card included), or a model directory re-saved as safetensors."""
    if source.run is None:
        model, tokenizer = _load_hf(source.path)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        return {"merge": None}
    merged, report = _hf_model_dir(source, tmp, prompts)
    for item in merged.iterdir():
        item.rename(tmp / item.name)
    merged.rmdir()
    return {"merge": {"verification": report["verification"]}}


@register_exporter("gguf", summary="one GGUF file plus an Ollama Modelfile")
def _export_gguf(source: Source, tmp: Path, quant: str, force: bool, prompts: int, new_tokens: int | None) -> dict[str, Any]:
    from tunelab.export.card import model_card
    from tunelab.export.gguf_model import write_gguf
    from tunelab.export.modelfile import modelfile_text
    from tunelab.export.gguf_vocab import build_vocab
    from tunelab.generation import end_of_turn_ids

    hf_dir, merge = _hf_model_dir(source, tmp, prompts)
    model, tokenizer = _load_hf(hf_dir)
    gguf = tmp / _gguf_name(source, quant)
    counts = write_gguf(gguf, model, tokenizer, quant, source.name)
    adds_bos = build_vocab(tokenizer, int(model.config.vocab_size)).add_bos
    stops = [tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(tokenizer)]
    modelfile, parity = modelfile_text(gguf.name, tokenizer, stops, adds_bos)
    (tmp / "Modelfile").write_text(modelfile, encoding="utf-8")
    verification = verify_gguf(gguf, model, tokenizer, source, quant, force, prompts, new_tokens)
    if hf_dir != source.path:
        shutil.rmtree(hf_dir)  # the merge was only the way to the GGUF
    report = {"file": gguf.name, "bytes": gguf.stat().st_size, "quant": quant, "tensor_types": counts,
              "modelfile": {"stops": stops, "template_parity": parity},
              "merge": {"verification": merge["verification"]} if merge else None, "verification": verification}
    (tmp / "README.md").write_text(model_card(source, report), encoding="utf-8")
    return report
