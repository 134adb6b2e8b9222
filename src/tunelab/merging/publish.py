"""Write a merged model (several models merged, or a blend of a run and its base) as a verified HF directory.

The model computed in memory is the one that was scored; what is published must be that model. So the
saved folder is reloaded with plain ``AutoModelForCausalLM`` and compared with the in-memory model on held
prompts (``tunelab.merging.verify``: max |Δ logit| within the dtype's tolerance, equal greedy answers)
before the folder appears, complete with ``merge_report.json`` and its ``README.md`` card, or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.atomic import atomic_dir
from tunelab.errors import TunelabError
from tunelab.merging.verify import TOLERANCE, compare, held_conversations, reference_of
from tunelab.runs import Run

REPORT_FILE = "merge_report.json"


def check_out_dir(out: Path, inputs: list[Path]) -> None:
    """Refuse an output folder that is one of the inputs (or holds one), or that holds anything but an earlier merge."""
    out_r = out.resolve()
    for source in inputs:
        source_r = source.resolve()
        if out_r == source_r or out_r in source_r.parents:
            raise TunelabError(f"merge output {out} would replace {source}, one of the models merged; choose another folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT_FILE).is_file())):
        raise TunelabError(f"merge output {out} exists and is not an earlier merge (no {REPORT_FILE}); choose a new "
                           "folder or remove it")


def held_prompts(runs: list[Run], limit: int) -> tuple[str, list[list[dict]]]:
    """Prompts to verify on: the first run's eval conversations, else the built-in probe questions."""
    from tunelab.evaluation.report import load_probe

    for run in runs:
        return held_conversations(run, limit)
    probe = load_probe(True)[:limit]
    return "built-in general probe", [[{"role": "user", "content": item["question"]}] for item in probe]


def publish(out: Path, loaded: Any, held: tuple[str, list[list[dict]]], report_of: Callable[[dict], dict],
            card_of: Callable[[dict], str], *, force: bool = False, new_tokens: int = 16) -> dict[str, Any]:
    """Save ``loaded`` (model and tokenizer) to ``out``, verified against itself as reloaded from disk.

    Args:
        out: Folder to write (replaced if it holds an earlier merge; check it first with ``check_out_dir``).
        loaded: The merged model as it was scored (``LoadedModel``).
        held: (where they came from, conversations) to compare on.
        report_of: Builds the report from the verification figures (``report["verification"]``).
        card_of: Builds the ``README.md`` from the report.
        force: Publish even if the saved model does not reproduce the in-memory one (recorded in the report).
        new_tokens: Greedy tokens compared per prompt.

    Returns:
        The report, also written to ``out/merge_report.json``.

    Raises:
        TunelabError: The check failed and ``force`` is off; nothing is written then.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = reference_of(loaded.model, loaded.tokenizer, held[0], held[1], new_tokens)
    dtype = next(loaded.model.parameters()).dtype
    with atomic_dir(out) as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        saved = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, use_safetensors=True)
        check = compare(reference, saved, AutoTokenizer.from_pretrained(tmp), new_tokens, TOLERANCE.get(dtype, 1e-3))
        del saved
        report = report_of(check)
        report.update(verification=check, forced=bool(force and not check["passed"]))
        if not check["passed"] and not force:
            raise TunelabError(f"the merged model as written to disk does not compute what was scored in memory: max "
                               f"|Δ logit| {check['max_abs_logit_diff']:.3g} (tolerance {check['tolerance']:g}), "
                               f"{len(check['answers_differ'])} of {check['n_prompts']} greedy answers differ. Nothing "
                               "was written; this is a bug, please report it (or pass --force to write it anyway)")
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(card_of(report), encoding="utf-8")
        for path in tmp.iterdir():
            path.chmod(0o644)  # safetensors writes 0600; a published model is meant to be read by others
    return report
