"""Fold a run's update into its base model and publish the result as a plain transformers directory.

``merge_run`` loads the tuned model exactly as it was evaluated (``load_for_eval``), folds it with the
method's own ``merge()``, saves it with the training tokenizer and chat template, reloads what was saved
with ``AutoModelForCausalLM.from_pretrained`` and checks it against the unmerged model on held prompts
(``tunelab.merging.verify``) before anything is published: the directory appears complete, with its
``merge_report.json`` and ``README.md`` model card, or not at all (``atomic_dir``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tunelab.atomic import atomic_dir, check_replaceable
from tunelab.errors import TunelabError
from tunelab.merging.card import headline, model_card
from tunelab.merging.verify import TOLERANCE, compare, held_conversations, reference_of
from tunelab.methods import get_method, method_names
from tunelab.runs import Run, open_run
from tunelab.models.vision import save_processor_files

REPORT_FILE = "merge_report.json"


def _open(run_dir: str | Path) -> Run:
    run = open_run(run_dir)
    if run is None:
        raise TunelabError(f"{run_dir}: not a tunelab run directory (no manifest.json); give the output_dir of a `tunelab train` run")
    if not run.artifact_dir.is_dir():
        raise TunelabError(f"{run_dir}: the run has no {run.artifact_dir.name}/ yet (unfinished?); finish it with "
                           "`tunelab train ... --resume`, then merge")
    return run


def _is_prompt_learning(artifact: Path) -> bool:
    if not (artifact / "adapter_config.json").is_file():
        return False
    from peft import PeftConfig

    return bool(PeftConfig.from_pretrained(str(artifact)).is_prompt_learning)


def _needs_special_base(method: Any, run: Run) -> bool:
    """Whether the method loads its base in a special way (QLoRA: quantized) that a fold cannot keep."""
    try:
        return "quantization_config" in method.base_load_kwargs(method.options_class(**run.method_options()))
    except TunelabError:
        return True  # it names a quantization library this machine lacks: the base is not a plain one


def refusal_reason(run: Run, method: Any) -> str:
    """Why the run's update cannot be folded into its base weights, and what to do instead."""
    name = run.method_name
    why = getattr(method, "merge_refusal", None)  # a method may state its own reason
    if why is None and _is_prompt_learning(run.artifact_dir):
        why = (f"{name} trains virtual tokens that the model attends to in front of every prompt; they are not a change "
               "of any weight, so there is nothing to fold into the base")
    elif why is None and _needs_special_base(method, run):
        why = (f"{name} trained and was evaluated on a quantized base; folding the update into quantized weights rounds "
               "it away, and folding it into the full-precision base gives a model that was never evaluated")
    elif why is None:
        why = f"{name} adds modules of its own to the model; no change of the existing weights computes what they do"
    mergeable = ", ".join(n for n in method_names() if get_method(n).mergeable)
    return (f"cannot merge {run.path}: {why}. Serve the adapter instead (the base model with {run.artifact_dir} applied, "
            f"as `tunelab eval --model {run.path}` loads it), or train with a mergeable method ({mergeable}) to get one model.")


def fold_in_memory(run_dir: str | Path) -> tuple[Run, Any]:
    """The run's tuned model with its update folded into the weights (nothing written), as ``LoadedModel``.

    Raises:
        TunelabError: Not a finished run, or a method whose update cannot be folded (with why and what instead).
    """
    from tunelab.evaluation.run import LoadedModel, load_for_eval

    run = _open(run_dir)
    method = get_method(run.method_name)
    if not method.mergeable:
        raise TunelabError(refusal_reason(run, method))
    loaded = load_for_eval(str(run.path))
    return run, LoadedModel(method.merge(loaded.model), loaded.tokenizer, f"run {run.path} (folded)")


def _check_out_dir(run: Run, out: Path) -> None:
    check_replaceable(out, run.path, REPORT_FILE, "merge", f"the run directory {run.path}")


def merge_run(run_dir: str | Path, out_dir: str | Path, *, force: bool = False, prompts: int = 8, new_tokens: int = 16,
              tolerance: float | None = None) -> dict[str, Any]:
    """Fold the run's tuned model into its base and write it, verified, as a plain HF safetensors directory.

    Args:
        run_dir: A finished tunelab run directory of a mergeable method (lora, ia3, freeze, full, ...).
        out_dir: Folder to write (replaced if it holds an earlier merge).
        force: Publish even when the merged model does not reproduce the tuned one (recorded in the report).
        prompts: Held prompts to verify on (the run's eval examples, else the general probe questions).
        new_tokens: Greedy tokens generated per prompt for the answer comparison.
        tolerance: Largest accepted |Δ logit|; default by dtype (1e-3 in float32, see ``verify.TOLERANCE``).

    Returns:
        The merge report, also written to ``out_dir/merge_report.json``.

    Raises:
        TunelabError: Not a finished run, a method that cannot be folded (with why and what to do instead),
            an output folder that is not safe to replace, or a failed verification without ``force``
            (then nothing is written).
    """
    from tunelab.evaluation.run import load_for_eval

    started = time.time()
    run = _open(run_dir)
    method = get_method(run.method_name)
    if not method.mergeable:
        raise TunelabError(refusal_reason(run, method))
    out = Path(out_dir)
    _check_out_dir(run, out)
    loaded = load_for_eval(str(run.path))
    source, conversations = held_conversations(run, prompts)
    reference = reference_of(loaded.model, loaded.tokenizer, source, conversations, new_tokens)
    merged = method.merge(loaded.model)
    dtype = next(merged.parameters()).dtype
    limit = tolerance if tolerance is not None else TOLERANCE.get(dtype, 1e-3)
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        save_processor_files(run.base_model, tmp)  # a VLM's image processor travels with it
        loaded.tokenizer.save_pretrained(tmp)
        del merged, loaded
        verification = _verify_saved(tmp, dtype, reference, new_tokens, limit)
        report = _report(run, out, dtype, verification, force, started)
        if not verification["passed"] and not force:
            raise TunelabError(_failure(run, verification))
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(run, report), encoding="utf-8")
        for path in tmp.iterdir():
            path.chmod(0o644)  # safetensors writes 0600; a published model is meant to be read by others
    return report


def _verify_saved(saved: Path, dtype: Any, reference: Any, new_tokens: int, tolerance: float) -> dict[str, Any]:
    """Compare the model as written (reloaded with plain transformers) against the unmerged reference."""
    from transformers import AutoTokenizer

    from tunelab.models.vision import auto_model_class

    model = auto_model_class(saved).from_pretrained(saved, dtype=dtype, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(saved)
    return compare(reference, model, tokenizer, new_tokens, tolerance)


def _report(run: Run, out: Path, dtype: Any, verification: dict[str, Any], force: bool, started: float) -> dict[str, Any]:
    manifest = run.record
    return {
        "run": str(run.path), "output": str(out), "base_model": run.base_model, "method": run.method_name,
        "method_options": run.method_options(), "dtype": str(dtype).removeprefix("torch."),
        "config_hash": manifest.config_hash, "data_hash": manifest.data_hash,
        "code_hash": manifest.code_hash, "eval": headline(run), "verification": verification,
        "forced": bool(force and not verification["passed"]), "seconds": round(time.time() - started, 2),
    }


def _failure(run: Run, check: dict[str, Any]) -> str:
    differing = check["answers_differ"]
    example = f"; e.g. {differing[0]['prompt']!r}: {differing[0]['unmerged']!r} -> {differing[0]['merged']!r}" if differing else ""
    return (f"merge of {run.path} failed verification on {check['n_prompts']} held prompts ({check['prompts']}): max |Δ logit| "
            f"{check['max_abs_logit_diff']:.3g} (tolerance {check['tolerance']:g}), {len(differing)} greedy answer(s) "
            f"differ{example}. Nothing was written. The merged model does not compute what the tuned one did; "
            "serve the adapter instead, or pass force to publish it anyway (recorded in merge_report.json).")
