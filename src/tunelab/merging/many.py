"""``tunelab merge MERGE.yaml``: merge several models of one family with a registered rule, scored and verified.

Each model is a run directory (its update folded into its base in memory, as ``merge_run`` folds it) or
an HF directory. Every model is checked against the base (else the first model) before any weight is
combined: configs, vocabulary, special tokens and chat template (``checks.check_same_family``), then
tensor names, shapes and dtypes (``rules.merge_state_dicts``). The base, each model and the merge are
scored on the task of every model that is a run with eval data, with that run's own settings, and asked
the forgetting probe (``tunelab.merging.scoring``), so the report shows what the merge kept of each task
next to each single model. The result is published with ``tunelab.merging.publish``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tunelab.evaluation.run import LoadedModel, load_for_eval
from tunelab.merging.card import merge_card
from tunelab.merging.checks import check_same_family, check_state_dicts
from tunelab.merging.fold import fold_in_memory
from tunelab.merging.publish import check_out_dir, held_prompts, publish
from tunelab.merging.rules import MergeInput, get_merge_rule, merge_state_dicts
from tunelab.merging.scoring import Probe, Task, base_probe, eval_settings_of, run_probe, run_task, score
from tunelab.merging.spec import MergeSection
from tunelab.runs import Run, open_run


@dataclass
class Source:
    """A model taking part in a merge, loaded as full weights."""

    name: str
    path: str
    loaded: LoadedModel
    run: Run | None


def load_source(path: str, name: str) -> Source:
    """Load a run directory (folded in memory) or a model (alias, HF dir) with the tokenizer it is used with."""
    if open_run(path) is not None:
        run, loaded = fold_in_memory(path)
        return Source(name, path, loaded, run)
    return Source(name, path, load_for_eval(path), None)


def _names(paths: list[str]) -> list[str]:
    """Short unique names for the models: their folder names, numbered where two are the same."""
    names = [Path(p).name or p for p in paths]
    return [f"{n}#{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _resolved(path: str) -> str:
    from tunelab.models.load import resolve_model_path

    resolved = resolve_model_path(path)
    return str(Path(resolved).resolve()) if Path(resolved).exists() else resolved  # a hub id stays as it is


def _base_warnings(base: Source | None, sources: list[Source]) -> list[str]:
    """Runs fine-tuned from another model than the merge's base: their task vectors hold that difference too."""
    if base is None:
        return []
    base_path = _resolved(base.path)
    return [f"{s.name} was fine-tuned from {s.run.base_model}, not from the merge's base {base.path}; its task vector "
            "includes the difference between the two" for s in sources
            if s.run is not None and str(Path(s.run.base_model).resolve()) != base_path]


def _load_all(spec: MergeSection, say: Callable[[str], None]) -> tuple[Source | None, list[Source]]:
    """Load the base and the models, refusing each model that is not of the base's (else the first model's) family."""
    base = None
    if spec.base is not None:
        say(f"loading the base {spec.base} ...")
        base = load_source(spec.base, "base")
    sources: list[Source] = []
    for entry, name in zip(spec.models, _names([m.path for m in spec.models])):
        say(f"loading {entry.path} ...")
        source = load_source(entry.path, name)
        reference = base or (sources[0] if sources else None)
        if reference is not None:
            check_same_family(reference.loaded.model.config, reference.loaded.tokenizer, source.loaded.model.config,
                              source.loaded.tokenizer, names=(reference.path, source.path))
        sources.append(source)
    return base, sources


def _scores(loaded: LoadedModel, tasks: list[Task], probe: Probe | None) -> dict[str, Any]:
    return {"tasks": {task.name: score(loaded, task, task.name) for task in tasks},
            "probe": probe.measure(loaded) if probe is not None else None}


def _score_inputs(base: Source | None, sources: list[Source], runs: list[Run], limit: int | None,
                  say: Callable[[str], None]) -> tuple[list[Task], Probe | None, list[dict[str, Any]]]:
    """The runs' tasks, the probe (asked of the base first; none without a base) and the base's and models' scores."""
    tasks = [task for s in sources if s.run is not None and (task := run_task(s.run, s.name, limit)) is not None]
    items = next((p for run in runs if (p := run_probe(run, limit))), None)
    probe = base_probe(base.loaded, items, eval_settings_of(runs[0]).batch_size) if base is not None and runs else None
    rows = []
    for source, role in [(base, "base")] * (base is not None) + [(s, "model") for s in sources]:
        say(f"scoring {source.name} on {len(tasks)} task(s){' and the probe' if probe else ''} ...")
        rows.append({"model": source.name, "role": role, "path": source.path, **_scores(source.loaded, tasks, probe)})
        say(f"{source.name}: {_summary(rows[-1])}")
    return tasks, probe, rows


def _summary(row: dict[str, Any]) -> str:
    scores = [f"{name} {s['score']:.3f}" for name, s in row["tasks"].items()]
    retention = row["probe"]["retention"] if row["probe"] else None
    kept = [f"probe retention {retention:.0%}" if retention is not None else "probe retention n/a (the base answered none)"]
    return ", ".join(scores + (kept if row["probe"] else []))


def merge_models(spec: MergeSection, out_dir: str | Path, *, force: bool = False, prompts: int = 8, new_tokens: int = 16,
                 limit: int | None = None, say: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Merge the models of ``spec``, score the inputs and the merge on the runs' tasks, and write a verified HF dir.

    Args:
        spec: The validated ``merge:`` section (``spec.load_merge_spec``).
        out_dir: Folder to write (replaced if it holds an earlier merge).
        force: Publish even if the written model does not reproduce the one scored in memory.
        prompts: Held prompts the written model is verified on.
        new_tokens: Greedy tokens compared per held prompt.
        limit: Score on the first N eval examples of each task and N probe items only (quicker, rougher).
        say: Progress messages.

    Returns:
        The report (also ``out_dir/merge_report.json``): inputs, rule, scores per model and task, verification.

    Raises:
        TunelabError: Models of different families (naming what differs), runs that cannot be folded, an unsafe
            output folder, or a failed verification without ``force``.
    """
    started = time.time()
    out = Path(out_dir)
    check_out_dir(out, [Path(p) for p in [spec.base, *(m.path for m in spec.models)] if p and Path(p).exists()])
    rule = get_merge_rule(spec.method)
    base, sources = _load_all(spec, say)
    inputs = [MergeInput(s.loaded.model.state_dict(), weight=e.weight, density=e.density or 1.0, name=s.name)
              for s, e in zip(sources, spec.models)]
    base_state = base.loaded.model.state_dict() if base else None
    check_state_dicts(base_state, inputs)  # names, shapes, dtypes: refused before minutes of scoring
    runs = [s.run for s in sources if s.run is not None]
    tasks, probe, rows = _score_inputs(base, sources, runs, limit, say)
    lambda_ = 1.0 if spec.lambda_ is None else spec.lambda_
    say(f"merging with {rule.name} ...")
    merged_state = merge_state_dicts(rule.name, base_state, inputs, lambda_=lambda_, seed=spec.seed)
    holder = (base or sources[0]).loaded
    del inputs
    holder.model.load_state_dict(merged_state)  # the base's (else first model's) skeleton now holds the merge
    merged = LoadedModel(holder.model, holder.tokenizer, "merged")
    say("scoring the merge ...")
    rows.append({"model": "merged", "role": "merge", "path": str(out), **_scores(merged, tasks, probe)})
    say(f"merged: {_summary(rows[-1])}")

    def report_of(check: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "merge", "method": rule.name, "rule": rule.summary, "base": spec.base, "lambda": lambda_,
                "seed": spec.seed, "limit": limit, "output": str(out), "dtype": str(next(merged.model.parameters()).dtype).removeprefix("torch."),
                "models": [{"name": s.name, "path": s.path, "weight": e.weight, "density": e.density,
                            "run_method": s.run.method_name if s.run else None,
                            "config_hash": s.run.record.config_hash if s.run else None}
                           for s, e in zip(sources, spec.models)],
                "tasks": [{"name": t.name, "metric": t.metric, "examples": len(t.examples)} for t in tasks],
                "scores": rows, "warnings": _base_warnings(base, sources), "seconds": round(time.time() - started, 2)}

    return publish(out, merged, held_prompts(runs, prompts), report_of, merge_card, force=force, new_tokens=new_tokens)
