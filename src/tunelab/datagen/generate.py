"""Sequence-level distillation data: a teacher model's answers to prompts, written as SFT data with provenance.

The teacher is loaded exactly as evaluation loads a model (:func:`tunelab.evaluation.run.load_for_eval`: a
model spec, or a run directory's artifact on its base with the run's chat template) and answers through the
shared decoding component (:mod:`tunelab.generation`). Every output record is a ``messages`` conversation
(the prompt plus the teacher's answer) and a ``meta`` field saying where it came from: the teacher (spec and
resolved path, for a run also its base, artifact and hashes), the decoding settings and the prompt's
``file:line``. tunelab's data loader ignores fields it does not know, so the file trains as it is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunelab.atomic import write_text_atomic
from tunelab.datagen.prompts import Prompt
from tunelab.errors import TunelabError
from tunelab.evaluation.run import LoadedModel, load_for_eval
from tunelab.generation import Completion, SamplingSettings, generate
from tunelab.generation.generate import model_device, seeded
from tunelab.models.load import resolve_model_path
from tunelab.runs import open_run

OnBatch = Callable[[int, int], None]
"""Called after each batch with (prompts done, prompts in all)."""


@dataclass
class Teacher:
    """A loaded model with a description of what it is, recorded in every generated record."""

    loaded: LoadedModel
    provenance: dict[str, Any]


@dataclass
class GenerationSummary:
    """What a generation pass produced, for the user to check before training on it."""

    n_prompts: int = 0
    n_written: int = 0
    truncated: list[str] = field(default_factory=list)  # sources whose answer hit max_new_tokens
    empty: list[str] = field(default_factory=list)  # sources whose answer was empty (never written)
    seconds: float = 0.0


def load_teacher(spec: str) -> Teacher:
    """Load a model spec (embedded alias, HF dir, .gguf, hub id) or a run directory, as evaluation does.

    Raises:
        TunelabError: The model or run cannot be found or loaded.
    """
    run = open_run(spec)
    if run is not None:
        manifest = run.record
        provenance = {"spec": spec, "kind": "run", "resolved": str(run.path.resolve()), "base": run.base_model,
                      "method": run.method_name, "artifact": str(run.artifact_dir.resolve()),
                      "config_hash": manifest.config_hash, "data_hash": manifest.data_hash}
    else:
        resolved = resolve_model_path(spec)
        local = Path(resolved)
        provenance = {"spec": spec, "kind": "model", "resolved": str(local.resolve()) if local.exists() else resolved}
    loaded = load_for_eval(spec)
    to_device(loaded.model)
    return Teacher(loaded, provenance)


def to_device(model) -> None:
    """Move a model to the GPU when there is one (unless accelerate already placed it, as for QLoRA)."""
    import torch

    if torch.cuda.is_available() and getattr(model, "hf_device_map", None) is None and model_device(model).type == "cpu":
        model.to("cuda")


def complete(loaded: LoadedModel, conversations: Sequence[Sequence[dict]], settings: SamplingSettings, *, batch_size: int = 16,
             on_batch: OnBatch | None = None) -> list[Completion]:
    """Answer every conversation, ``batch_size`` at a time, reporting progress after each batch.

    The results equal one :func:`tunelab.generation.generate` call over all conversations with the same
    settings and batch size: the seed is applied once around all batches, not once per batch.
    """
    if batch_size < 1:
        raise TunelabError(f"--batch-size {batch_size!r}: use a positive integer")
    unseeded = SamplingSettings(settings.temperature, settings.top_p, settings.max_new_tokens, None, settings.stop)
    results: list[Completion] = []
    with seeded(settings.seed, model_device(loaded.model)):
        for start in range(0, len(conversations), batch_size):
            batch = [list(c) for c in conversations[start: start + batch_size]]
            results += generate(loaded.model, loaded.tokenizer, batch, unseeded, batch_size=batch_size)
            if on_batch is not None:
                on_batch(len(results), len(conversations))
    return results


def generate_sft(teacher: Teacher, prompts: list[Prompt], settings: SamplingSettings, *, batch_size: int = 16,
                 keep_truncated: bool = False, on_batch: OnBatch | None = None) -> tuple[list[dict], GenerationSummary]:
    """The teacher's answer to every prompt as SFT records with provenance.

    Args:
        teacher: From :func:`load_teacher`.
        prompts: From :func:`tunelab.datagen.prompts.read_prompts`.
        settings: Decoding settings (temperature 0 is greedy).
        batch_size: Prompts per generation batch (sampled answers depend on it; greedy ones do not).
        keep_truncated: Also write answers cut off at ``max_new_tokens`` (by default they are left out,
            because a student trained on them learns to stop mid-answer).
        on_batch: Progress callback.

    Returns:
        The records (``{"messages": [...], "meta": {...}}``) in prompt order, and the summary.
    """
    started = time.time()
    completions = complete(teacher.loaded, [p.messages for p in prompts], settings, batch_size=batch_size, on_batch=on_batch)
    decoding = {**asdict(settings), "stop": list(settings.stop), "batch_size": batch_size}
    summary = GenerationSummary(n_prompts=len(prompts))
    records = []
    for prompt, completion in zip(prompts, completions):
        answer = completion.text.strip()
        if not answer:
            summary.empty.append(prompt.source)  # an empty answer is not valid SFT data
            continue
        if completion.finish_reason == "length":
            summary.truncated.append(prompt.source)
            if not keep_truncated:
                continue
        meta = {"teacher": teacher.provenance, "decoding": decoding, "source": prompt.source,
                "finish_reason": completion.finish_reason}
        records.append({"messages": [*prompt.messages, {"role": "assistant", "content": answer}], "meta": meta})
    summary.n_written = len(records)
    summary.seconds = round(time.time() - started, 2)
    return records, summary


def check_output(out: str | Path, inputs: Sequence[str | Path]) -> None:
    """Refuse an output path that would overwrite one of the input files.

    Raises:
        TunelabError: ``out`` is one of ``inputs``.
    """
    target = Path(out).resolve()
    for path in inputs:
        if Path(path).resolve() == target:
            raise TunelabError(f"--out {out} is the input file {path}; write the generated data to another file")


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write records as JSON lines, atomically (a failure leaves the previous file, or none, in place)."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
