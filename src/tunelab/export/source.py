"""What ``tunelab export`` reads: a finished run (merged into one model first) or a plain HF model directory,
and the held prompts its exports are checked on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.export.checks import Held
from tunelab.runs import Run, open_run

REPORT_FILE = "export_report.json"


@dataclass
class Source:
    """A run directory or an HF model directory to export."""

    path: Path
    run: Run | None

    @property
    def name(self) -> str:
        return self.path.resolve().name


def _check_base(run: Run) -> None:
    base = run.base_model
    looks_local = base.startswith(("/", ".", "~")) or base.count("/") != 1
    if looks_local and not (Path(base).expanduser() / "config.json").is_file():
        spec = (run.record.model or {}).get("spec", base)
        raise TunelabError(f"{run.path}: the run's base model {base} (model {spec!r}) is missing; the export needs it to "
                           "merge the run. Restore that directory (for an embedded alias run `tunelab models` to see "
                           "what is cached, then any command that loads it, e.g. `tunelab eval --model "
                           f"{spec}`, converts it again) and export again")


def _peft_type(artifact: Path) -> str | None:
    config = artifact / "adapter_config.json"
    return json.loads(config.read_text()).get("peft_type") if config.is_file() else None


def _refuse_vision_gguf(model_dir: Path, fmt: str) -> None:
    """A VLM goes to GGUF as two files (the text model and an mmproj projector) which this exporter and its
    llama.cpp parity checks do not produce; say so before anything loads."""
    from tunelab.models.vision import directory_has_vision

    kind = directory_has_vision(model_dir) if fmt != "hf" else None
    if kind:
        raise TunelabError(f"--format {fmt}: {model_dir} is a vision-language model ({kind}); GGUF export writes the text "
                           "model only, and llama.cpp needs the vision tower and projector as a separate mmproj file, which "
                           "tunelab does not write or check yet. Export with --format hf (the processor is kept)")


def open_source(path: str | Path, fmt: str) -> Source:
    """The run or model at ``path``, refused early (before any loading) when it cannot be exported as ``fmt``.

    Raises:
        TunelabError: Not a run nor an HF directory, an unfinished run, a missing base model, or a method
            that does not give one model (prompt/prefix tuning, Houlsby adapters, QLoRA) or a LoRA (for gguf-lora).
    """
    from tunelab.merging import refusal_reason
    from tunelab.methods import get_method

    path = Path(path)
    run = open_run(path)
    _refuse_vision_gguf(path if run is None else Path(run.base_model), fmt)
    if run is None:
        if not (path / "config.json").is_file():
            raise TunelabError(f"export: {path} is neither a tunelab run directory (manifest.json) nor a Hugging Face "
                               "model directory (config.json)")
        if fmt == "gguf-lora":
            raise TunelabError(f"--format gguf-lora exports a run's LoRA adapter; {path} is a whole model: use --format gguf")
        return Source(path, None)
    if not run.artifact_dir.is_dir():
        raise TunelabError(f"{path}: the run has no {run.artifact_dir.name}/ yet (unfinished?); finish it with "
                           "`tunelab train ... --resume`, then export")
    method = get_method(run.method_name)
    if fmt == "gguf-lora":
        if _peft_type(run.artifact_dir) != "LORA":
            raise TunelabError(f"--format gguf-lora: {path} was trained with {run.method_name}, not LoRA; llama.cpp's "
                               "--lora takes LoRA adapters only. Export the merged model with --format gguf instead")
    elif not method.mergeable:
        raise TunelabError(f"export needs the run as one model: {refusal_reason(run, method)}")
    _check_base(run)
    return Source(path, run)


def held_prompts(source: Source, limit: int) -> Held:
    """Up to ``limit`` held conversations: the run's eval examples (with their reference answers), else the probe."""
    from tunelab.evaluation.report import load_probe

    if source.run is not None:
        from tunelab.data import load_examples
        from tunelab.evaluation.run import split_example

        files = (source.run.config.get("data") or {}).get("eval") or []
        files = [files] if isinstance(files, str) else list(files)
        if files and all(Path(f).exists() for f in files):
            pairs = [split_example(e) for e in load_examples(files, **source.run.data_settings())[:limit]]
            if pairs and all(c for c, _ in pairs):
                return Held(f"data.eval ({', '.join(files)})", [c for c, _ in pairs], [r for _, r in pairs])
    probe = load_probe(True)[:limit]
    return Held("built-in general probe", [[{"role": "user", "content": item["question"]}] for item in probe])


def held_new_tokens(source: Source, held: Held) -> int:
    """Tokens to generate per held prompt: the run's ``eval.max_new_tokens`` on its own eval examples (its task
    score is then comparable with eval.json's: 32 tokens cut the demo's longer SQL answers, 72.5 % vs 77.5 %), else 32."""
    if source.run is None or not held.references:
        return 32
    from tunelab.config.schema import EvalConfig

    return EvalConfig(**(source.run.config.get("eval") or {})).max_new_tokens


def task_scores(source: Source, held: Held, answers: dict[str, list[str]]) -> dict[str, Any] | None:
    """The run's own metric on each model's answers to the held eval prompts; None without references or metric."""
    if source.run is None or not held.references:
        return None
    from tunelab.config.schema import EvalConfig
    from tunelab.evaluation.metrics import score

    settings = EvalConfig(**(source.run.config.get("eval") or {}))
    if settings.metric in ("loss", "perplexity"):
        return None
    options = settings.metric_options()
    try:
        scores = {name: score(settings.metric, list(texts), list(held.references), **options).score
                  for name, texts in answers.items()}
    except TunelabError as err:  # e.g. the run's SQL database is gone: the export stands, the score is not known
        return {"metric": settings.metric, "error": str(err)}
    return {"metric": settings.metric, **scores}
