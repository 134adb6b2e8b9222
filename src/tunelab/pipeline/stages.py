"""What each kind of stage reads, where it writes, and how it runs — every kind through the same code its
own command uses (a recipe's ``main``, ``merge_run``, ``export_model``, ``tunelab eval``'s evaluation, the
``tunelab data`` commands).

A stage's *inputs* are what its result depends on: its options and resolved config (with each earlier
stage it names standing as that stage's key), and the content hash of every file it reads that no stage
made. The pipeline's content address of a stage is the hash of these (``pipeline.runner``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from tunelab.data import data_fingerprint
from tunelab.pipeline.spec import KIND_KEYS, Stage, is_training
from tunelab.runs.manifest import FILE as MANIFEST_FILE
from tunelab.runs.manifest import read_manifest

# ``set`` keys whose value may name an earlier stage (elsewhere a value equal to a stage's name stays as it is)
REFERENCE_KEYS = ("init_from", "data.train", "data.eval", "recipe.teacher", "recipe.task_eval", "model", "model.path",
                  "eval.before_from")
OUTPUT = {"merge": "model", "export": "export", "eval": "report.json", "preferences": "pairs.jsonl", "generate": "data.jsonl",
          "synth": "train.jsonl"}
RESUMABLE = ("synth",)  # besides training: kinds that carry on from what an interrupted attempt left in their folder


def output_of(stage: Stage, folder: Path) -> Path:
    """Where ``stage`` (run in ``folder``) leaves what later stages use."""
    return folder / ("run" if is_training(stage.kind) else OUTPUT[stage.kind])


def outputs_of(stage: Stage, folder: Path) -> dict[str, Path]:
    """Every name later stages can use for ``stage``'s results: its own name, and ``NAME.eval`` for a synth's held-out split."""
    named = {stage.name: output_of(stage, folder)}
    if stage.kind == "synth":
        named[f"{stage.name}.eval"] = folder / "eval.jsonl"
    return named


def _map(value: Any, leaf, drop_unset: bool = False) -> Any:
    """``value`` with ``leaf`` applied to every string in it (through lists and mappings), and with
    ``drop_unset`` its mappings' None-valued keys left out."""
    if isinstance(value, dict):
        mapped = {k: _map(v, leaf, drop_unset) for k, v in value.items()}
        return {k: v for k, v in mapped.items() if not (drop_unset and v is None)}
    if isinstance(value, list):
        return [_map(v, leaf, drop_unset) for v in value]
    return leaf(value) if isinstance(value, str) else value


def _resolve(value: Any, outputs: dict[str, Path]) -> Any:
    """A value naming an earlier stage, as that stage's output path."""
    return _map(value, lambda s: str(outputs[s]) if s in outputs else s)


def training_config(stage: Stage, outputs: dict[str, Path], run_dir: Path):
    """The stage's run config: its file, its ``set`` overrides (stage names resolved in the keys that take a
    path: ``REFERENCE_KEYS``), its run directory."""
    from tunelab.resolve import load_config

    overrides = [f"{key}={json.dumps(_resolve(value, outputs) if key in REFERENCE_KEYS else value)}"
                 for key, value in stage.set.items()]
    return load_config(stage.config, overrides + [f"output_dir={run_dir}"])


def options_of(stage: Stage, outputs: dict[str, Path]) -> dict[str, Any]:
    """A non-training stage's options (those of its kind), stage names resolved in ``from``, ``model``, ``data``."""
    fields = stage.model_dump(by_alias=False, include=KIND_KEYS[stage.kind])
    return {k: _resolve(v, outputs) if k in ("from_", "model", "data") else v for k, v in fields.items()}


def stage_inputs(stage: Stage, outputs: dict[str, Path], keys: dict[str, str], folder: Path) -> dict[str, Any]:
    """``{"config": ..., "files": {path: hash}, "parents": {name: key}}``: what the stage's result depends on."""
    from tunelab.config.load import resolved_dict

    by_path = {str(outputs[name]): f"stage:{name}:{key}" for name, key in keys.items()}
    if is_training(stage.kind):
        from tunelab.stages.run import hashed_inputs

        config = training_config(stage, outputs, output_of(stage, folder))
        tree = {k: v for k, v in resolved_dict(config).items() if k != "output_dir"}
        files = [f for f in hashed_inputs(config) if f not in by_path]
        if config.eval.db and config.eval.db not in by_path:
            files.append(config.eval.db)
    else:
        tree = options_of(stage, outputs)
        files = [tree[k] for k in ("data", "db") if isinstance(tree.get(k), str) and tree[k] not in by_path and Path(tree[k]).is_file()]
        if stage.kind == "synth":  # the documents folder and the user's prompt files
            files += [p for p in (tree.get("data"), (tree.get("synth") or {}).get("prompts")) if p and Path(p).is_dir()]
    # earlier stages' outputs stand as their keys; unset (None) settings are left out, so a setting tunelab adds
    # later (unset by default) leaves every existing stage's key as it was
    tree = _map(tree, lambda s: by_path.get(s, s), drop_unset=True)
    parents = {name: key for name, key in keys.items() if f"stage:{name}:{key}" in json.dumps(tree)}
    return {"kind": stage.kind, "config": tree,
            "files": {f: data_fingerprint([f]) for f in files if Path(f).exists()}, "parents": parents}


def run_stage(stage: Stage, outputs: dict[str, Path], folder: Path, *, resume: bool, console: Console) -> dict[str, Any]:
    """Run ``stage`` into ``folder``; returns its summary (scores, costs) for the pipeline report."""
    out = output_of(stage, folder)
    if is_training(stage.kind):
        from tunelab.recipes import get_recipe

        config = training_config(stage, outputs, out)
        get_recipe(config.recipe.name).main(config, resume=resume and (out / MANIFEST_FILE).exists(), console=console)
        record = read_manifest(out)
        if record is None:  # the recipe finished without recording the run: a bug, not a user mistake
            raise FileNotFoundError(out / MANIFEST_FILE)
        return {**(record.eval_summary or {}), "train_seconds": record.train_seconds, "artifact_mb": record.artifact_mb}
    options = options_of(stage, outputs)
    return _RUNNERS[stage.kind](options, out, console)


def _merge(options: dict, out: Path, console: Console) -> dict[str, Any]:
    from tunelab.merging import merge_run

    report = merge_run(options["from_"], out, prompts=options["prompts"], force=options["force"])
    console.print(f"Merged {options['from_']} into {out}.", markup=False)
    check = report.get("verification") or {}
    return {"verified": check.get("passed"), "forced": report.get("forced"), "max_abs_logit_diff": check.get("max_abs_logit_diff")}


def _export(options: dict, out: Path, console: Console) -> dict[str, Any]:
    from tunelab.export import export_model

    report = export_model(options["from_"], options["format"], options["quant"], out, prompts=options["prompts"],
                          new_tokens=options.get("max_new_tokens"), force=options["force"])
    check = report.get("verification") or {}
    console.print(f"Exported {options['from_']} to {report['output']} ({report.get('file')}).")
    return {"file": report.get("file"), "greedy_agreement": check.get("greedy_agreement"),
            "perplexity_increase": check.get("perplexity_increase")}


def _eval(options: dict, out: Path, console: Console) -> dict[str, Any]:
    from tunelab.data import load_examples
    from tunelab.evaluation.run import evaluate, load_for_eval, write_report
    from tunelab.runs import open_run

    run = open_run(options["model"])
    recorded = (run.config.get("eval") or {}) if run is not None else {}
    metric = options.get("metric") or recorded.get("metric") or "exact_match"
    db = options.get("db") or (recorded.get("db") if metric == recorded.get("metric") else None)
    examples = load_examples([options["data"]], **(run.data_settings() if run is not None else {}))[: options.get("limit")]
    loaded = load_for_eval(options["model"])
    report = evaluate(loaded, examples, metric, max_new_tokens=options.get("max_new_tokens") or recorded.get("max_new_tokens", 128),
                      options={"db": db} if db else {})
    write_report(report, out)
    console.print(f"{metric} of {options['model']} on {options['data']}: {report['score']:.4f} ({report['n']} examples).")
    return {"score": report["score"], "metric": metric, "n": report["n"]}


def _preferences(options: dict, out: Path, console: Console) -> dict[str, Any]:
    from tunelab.datagen.cli import preferences_command

    preferences_command(model=Path(options["model"]), data=Path(options["data"]), out=out, metric=options.get("metric"),
                        db=Path(options["db"]) if options.get("db") else None, option=None,
                        max_new_tokens=options.get("max_new_tokens"), batch_size=None, threshold=1.0)
    summary = json.loads(out.with_name(out.stem + ".summary.json").read_text(encoding="utf-8"))
    return {"pairs": summary.get("n_pairs"), "score": summary.get("score")}


def _generate(options: dict, out: Path, console: Console) -> dict[str, Any]:
    from tunelab.datagen.cli import generate_command

    generate_command(model=options["model"], prompts=Path(options["data"]), out=out,
                     max_new_tokens=options.get("max_new_tokens") or 256, temperature=0.0, top_p=1.0, seed=0, batch_size=16,
                     keep_truncated=False)
    return {"records": sum(1 for _ in out.open(encoding="utf-8"))}


def _synth(options: dict, out: Path, console: Console) -> dict[str, Any]:
    from tunelab.models.embedded import DEFAULT_MODEL
    from tunelab.synth.cli import progress_bars, open_tokenizer, settings_from
    from tunelab.synth.generators import open_generator
    from tunelab.synth.run import Outputs, synthesize

    settings = settings_from(**options["synth"])
    cache = out.with_name("train.cache.jsonl")
    earlier = out.parent.with_name(out.parent.name + ".previous") / cache.name  # the runner's copy of the last result
    if earlier.is_file() and not cache.exists():
        shutil.copyfile(earlier, cache)  # replies are keyed by what produced them: a changed filter reuses them all
    generator = open_generator(options.get("model") or DEFAULT_MODEL, batch_size=settings.batch_size)
    with progress_bars() as update:
        summary = synthesize(options["data"], generator, open_tokenizer(generator, None), settings,
                             Outputs(out, out.with_name("eval.jsonl")), cache=cache, on_progress=update)
    console.print(f"Synthesised {summary['train']} training and {summary['eval']} held-out pairs from {summary['documents']} documents.")
    return {"pairs": summary["train"], "heldout_pairs": summary["eval"], "replies_from_cache": summary["replies_from_cache"]}


_RUNNERS = {"merge": _merge, "export": _export, "eval": _eval, "preferences": _preferences, "generate": _generate, "synth": _synth}
