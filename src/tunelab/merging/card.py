"""The model card (``README.md``) of a merged model: where it came from and what it was measured to do."""

from __future__ import annotations

import json
from typing import Any

from tunelab.evaluation.summary import eval_summary


def headline(run: Any) -> dict[str, Any]:
    """The run's evaluation headline numbers: from ``eval.json`` where it has one, else its manifest's summary."""
    results = run.eval_results()
    if results:
        return eval_summary(results)
    return dict(run.manifest.get("eval_summary") or {})


def _rows(pairs: list[tuple[str, Any]]) -> str:
    return "\n".join(f"| {k} | {v} |" for k, v in pairs if v is not None)


def model_card(run: Any, report: dict[str, Any]) -> str:
    """Markdown describing the merged model: base, method, the run's hashes, evaluation and the fold's check."""
    manifest = run.manifest
    provenance = [("base model", f"`{run.base_model}`"), ("method", f"`{run.method_name}`"),
                  ("method options", f"`{json.dumps(run.method_options(), sort_keys=True)}`"),
                  ("run directory", f"`{run.path}`"), ("config hash", manifest.get("config_hash")),
                  ("data hash", manifest.get("data_hash")), ("code hash", manifest.get("code_hash")),
                  ("git commit", manifest.get("git_commit")), ("tunelab", manifest.get("tunelab_version")),
                  ("data files", ", ".join(f"`{f}`" for f in manifest.get("data_files") or []) or None)]
    scores = [(k, round(v, 4) if isinstance(v, float) else v) for k, v in headline(run).items()]
    check = report["verification"]
    verification = [("held prompts", f"{check['n_prompts']} from {check['prompts']} ({check['prompt_tokens']} tokens)"),
                    ("max abs logit difference", f"{check['max_abs_logit_diff']:.3g} (tolerance {check['tolerance']:g})"),
                    ("greedy answers agreeing", f"{check['answers_agree']} of {check['n_prompts']} ({check['new_tokens']} new tokens)"),
                    ("passed", "yes" if check["passed"] else "**no: published with --force**")]
    parts = [
        f"# {run.path.name} (merged)\n",
        f"`{run.base_model}` with the `{run.method_name}` update of the tunelab run `{run.path}` folded into its "
        f"weights: a plain transformers model (`AutoModelForCausalLM.from_pretrained`), dtype {report['dtype']}, with "
        "the tokenizer and chat template used in training.\n",
        "## Provenance\n\n| | |\n|---|---|\n" + _rows(provenance) + "\n",
        "## Evaluation of the run (before merging)\n\n" + (("| | |\n|---|---|\n" + _rows(scores)) if scores else "The run recorded no evaluation.") + "\n",
        "## Merge check (merged against unmerged)\n\n| | |\n|---|---|\n" + _rows(verification) + "\n",
    ]
    return "\n".join(parts)
