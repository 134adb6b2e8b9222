"""The llama.cpp check of a GGUF export (``verify_gguf``), shared by the whole-model and the LoRA exporters.

A leaf beside the exporters: ``pipeline`` (``gguf``) and ``gguf_lora`` (``gguf-lora``) both check their file
here, so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.export.checks import THRESHOLDS, compare_runtime, judge
from tunelab.export.source import Source, held_new_tokens, held_prompts, task_scores


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
