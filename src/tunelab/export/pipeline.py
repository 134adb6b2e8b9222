"""``export_model``: a run or model written as HF, GGUF or a GGUF LoRA, checked in llama.cpp before it is published.

The output folder appears complete (model file, ``Modelfile``, ``export_report.json``, ``README.md``) or
not at all: everything is written into a temporary folder beside it and renamed into place
(``tunelab.atomic.atomic_dir``), so a failed check, a crash or a full disk leaves nothing half-written.
An output path ending in ``.gguf`` is the file alone, renamed into place the same way.
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
from tunelab.models.vision import save_processor_files


def default_out(source: Source, fmt: str, quant: str) -> Path:
    """``<source>-gguf-f16`` (or ``-hf``, ``-gguf-lora-f16``) beside the source."""
    suffix = fmt if fmt == "hf" else f"{fmt}-{quant}"
    return source.path.resolve().parent / f"{source.name}-{suffix}"


def _check_out(source: Source, out: Path) -> None:
    check_replaceable(out, source.path, REPORT_FILE, "export", str(source.path))


def _load_hf(directory: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoTokenizer

    from tunelab.models.vision import auto_model_class

    model = auto_model_class(directory).from_pretrained(directory, dtype=torch.float32, use_safetensors=True)
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
    """Export a run (merged) or HF model directory, verified, into a new folder (or one ``.gguf`` file).

    Args:
        path: A finished tunelab run directory or a Hugging Face model directory.
        fmt: ``hf`` (the merged model as safetensors), ``gguf`` (one GGUF file plus an Ollama Modelfile) or
            ``gguf-lora`` (a run's LoRA adapter as a GGUF adapter for llama.cpp's ``--lora``).
        quant: A GGUF type of ``tunelab.export.checks.THRESHOLDS`` (``f16``, ``bf16``, ``q8_0``, ``q6_K``,
            ``q5_K_M``, ``q4_K_M``, ``q4_0``; any case).
        out: Folder to write, default beside the source (see :func:`default_out`); a path ending in ``.gguf``
            (GGUF formats) is the file itself, written alone (the report is returned, not saved).
        force: Publish even when a check fails (recorded in the report), or without llama.cpp to check with.
        prompts: Held prompts to check on.
        new_tokens: Greedy tokens generated per prompt; default the run's ``eval.max_new_tokens`` when the
            prompts are its eval examples (so the task score is the run's own), else 32.

    Returns:
        The export report, also written to ``out/export_report.json`` when ``out`` is a folder.

    Raises:
        TunelabError: Bad input (see :func:`tunelab.export.source.open_source`), an architecture llama.cpp's
            converter does not support, or a failed check without ``force``; nothing is written then.
    """
    from tunelab.export.converter import canonical_quant

    exporter = EXPORTERS.find(fmt)
    if exporter is None:
        raise TunelabError(f"--format {fmt!r}: use one of {', '.join(EXPORTERS.names())}")
    if canonical_quant(quant) not in THRESHOLDS:
        raise TunelabError(f"--quant {quant!r}: use one of {', '.join(THRESHOLDS)}")
    quant = str(canonical_quant(quant))
    started = time.time()
    source = open_source(path, fmt)
    target = Path(out) if out is not None else default_out(source, fmt, quant)
    if fmt != "hf" and target.suffix.lower() == ".gguf":
        report = _export_file(exporter, source, target, quant, force, prompts, new_tokens)
        report.update(source=str(source.path), output=str(target), format=fmt, seconds=round(time.time() - started, 2))
        return report
    _check_out(source, target)
    with atomic_dir(target) as tmp:
        report = exporter(source, tmp, quant, force, prompts, new_tokens)
        report.update(source=str(source.path), output=str(target), format=fmt, seconds=round(time.time() - started, 2))
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for item in tmp.iterdir():
            item.chmod(0o644)
    return report


def _export_file(exporter: Any, source: Source, target: Path, quant: str, force: bool, prompts: int,
                 new_tokens: int | None) -> dict[str, Any]:
    """``--out x.gguf``: the export runs in a temporary folder beside ``target``; only its GGUF is renamed into place."""
    import os

    from tunelab.atomic import fsync_dir, make_temp_dir, recover_output

    recover_output(target)  # temporaries of a killed earlier export of this file
    if target.is_dir():
        raise TunelabError(f"export output {target} is a folder; name a new .gguf file or a folder without the suffix")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, target.name, "tmp")
    try:
        report = exporter(source, tmp, quant, force, prompts, new_tokens)
        written = tmp / report["file"]
        written.chmod(0o644)
        os.replace(written, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["file"] = target.name
    return report


@register_exporter("hf", summary="the merged model as safetensors")
def _export_hf(source: Source, tmp: Path, quant: str, force: bool, prompts: int, new_tokens: int | None) -> dict[str, Any]:
    """The merged run (its merge_report.json and model card included), or a model directory re-saved as safetensors."""
    if source.run is None:
        model, tokenizer = _load_hf(source.path)
        model.save_pretrained(tmp, safe_serialization=True)
        save_processor_files(source.path, tmp)
        tokenizer.save_pretrained(tmp)
        return {"merge": None}
    merged, report = _hf_model_dir(source, tmp, prompts)
    for item in merged.iterdir():
        item.rename(tmp / item.name)
    merged.rmdir()
    return {"merge": {"verification": report["verification"]}}


@register_exporter("gguf", summary="one GGUF file (llama.cpp's converter and quantizer) plus an Ollama Modelfile")
def _export_gguf(source: Source, tmp: Path, quant: str, force: bool, prompts: int, new_tokens: int | None) -> dict[str, Any]:
    from tunelab.export.card import model_card
    from tunelab.export.converter import write_gguf
    from tunelab.export.ggufinfo import read_info
    from tunelab.export.modelfile import modelfile_text
    from tunelab.generation import end_of_turn_ids

    hf_dir, merge = _hf_model_dir(source, tmp, prompts)
    gguf = tmp / _gguf_name(source, quant)
    write_gguf(hf_dir, gguf, quant, source.name)
    info = read_info(gguf)
    model, tokenizer = _load_hf(hf_dir)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(tokenizer)]
    modelfile, parity = modelfile_text(gguf.name, tokenizer, stops, bool(info["add_bos"]))
    (tmp / "Modelfile").write_text(modelfile, encoding="utf-8")
    verification = verify_gguf(gguf, model, tokenizer, source, quant, force, prompts, new_tokens)
    if hf_dir != source.path:
        shutil.rmtree(hf_dir)  # the merge was only the way to the GGUF
    report = {"file": gguf.name, "bytes": gguf.stat().st_size, "quant": quant, "architecture": info["architecture"],
              "tensor_types": info["tensor_types"], "converter": info["converter"],
              "modelfile": {"stops": stops, "template_parity": parity},
              "merge": {"verification": merge["verification"]} if merge else None, "verification": verification}
    (tmp / "README.md").write_text(model_card(source, report), encoding="utf-8")
    return report
