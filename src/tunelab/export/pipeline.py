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
from tunelab.export.checks import THRESHOLDS, compare_runtime, judge
from tunelab.export.source import REPORT_FILE, Source, held_new_tokens, held_prompts, open_source, task_scores

FORMATS = ("hf", "gguf", "gguf-lora")


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
    if fmt not in FORMATS:
        raise TunelabError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if quant not in THRESHOLDS:
        raise TunelabError(f"--quant {quant!r}: use one of {', '.join(THRESHOLDS)}")
    started = time.time()
    source = open_source(path, fmt)
    target = Path(out) if out is not None else default_out(source, fmt, quant)
    _check_out(source, target)
    with atomic_dir(target) as tmp:
        if fmt == "hf":
            report = _export_hf(source, tmp, prompts)
        elif fmt == "gguf":
            report = _export_gguf(source, tmp, quant, force, prompts, new_tokens)
        else:
            from tunelab.export.gguf_lora import export_lora

            report = export_lora(source, tmp, quant, force, prompts, new_tokens)
        report.update(source=str(source.path), output=str(target), format=fmt, seconds=round(time.time() - started, 2))
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for item in tmp.iterdir():
            item.chmod(0o644)
    return report


def _export_hf(source: Source, tmp: Path, prompts: int) -> dict[str, Any]:
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


def verify_gguf(gguf: Path, model: Any, tokenizer: Any, source: Source, quant: str, force: bool, prompts: int,
            new_tokens: int | None, lora: Path | None = None) -> dict[str, Any]:
    """Run the llama.cpp checks on ``gguf`` (with the ``lora`` adapter file) and judge them for ``quant``.

    Raises:
        TunelabError: A failed check, or no llama-cpp-python to check with, unless ``force``.
    """
    from tunelab.export.llamacpp import EXTRA, Runtime, llama_cpp_version

    if llama_cpp_version() is None:
        if not force:
            raise TunelabError(f"checking a GGUF export needs llama-cpp-python (llama.cpp's Python binding): {EXTRA}; "
                               "or pass --force to write the file unchecked (recorded in export_report.json)")
        return {"runtime": None, "checked": False, "failed": ["not checked: llama-cpp-python is not installed"],
                "forced": True}
    held = held_prompts(source, prompts)
    new_tokens = new_tokens or held_new_tokens(source, held)
    from tunelab.generation import render_prompt

    longest = max(len(render_prompt(tokenizer, c)) for c in held.conversations)
    answers = max((len(tokenizer(r)["input_ids"]) for r in held.references), default=0)
    runtime = Runtime(gguf, n_ctx=longest + max(new_tokens, answers) + 16, lora=lora)
    try:
        figures = compare_runtime(model, tokenizer, runtime, held, new_tokens)
    finally:
        runtime.close()
    failed = judge(figures, quant)
    figures.update(runtime=f"llama-cpp-python {llama_cpp_version()}", checked=True, thresholds=THRESHOLDS[quant],
                   failed=failed, forced=bool(failed and force),
                   task=task_scores(source, held, {"hf": figures["hf_answers"], "gguf": figures["gguf_answers"]}))
    if failed and not force:
        example = figures["differing"][:1]
        shown = f"; e.g. {example[0]['prompt'][:80]!r}: HF {example[0]['hf'][:60]!r}, GGUF {example[0]['gguf'][:60]!r}" if example else ""
        raise TunelabError(f"GGUF export of {source.path} ({quant}) failed its llama.cpp check on {figures['n_prompts']} "
                           f"held prompts: {'; '.join(failed)}{shown}. Nothing was written. Try a larger quantization "
                           "(f16, q8_0), or pass --force to publish it anyway (recorded in export_report.json).")
    return figures


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
