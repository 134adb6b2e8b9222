"""``tunelab compare``: one task, many ways to adapt the model, one report.

The sweep reads top to bottom:

1. validate the config, the candidate list and the sweep directory (nothing loads or is written before
   this passes): ``--out`` must be new, empty or a sweep (its ``sweep.yaml`` says ``kind: tunelab-sweep``),
   since a sweep writes into it and clears its own failed attempts there; a candidate folder already in it
   must be this sweep's, made from the same config and, if finished, scored with the same eval settings;
2. evaluate the untuned model once: zero-shot, k-shot, RAG and the forgetting probe
   (``untuned/eval_before.json``), shared by every trained candidate through ``eval.before_from``; a saved
   one is reused only where it was scored with the current eval settings (``plan_before``);
3. train each method as a normal run directory ``<sweep>/<method>/`` in its own process (isolated
   crashes and a true per-candidate peak memory), with the same data, epochs/steps and batch size
   (or the same seconds of training with ``--time-budget``, which sets ``train.max_seconds``);
   a finished candidate is skipped and an interrupted one resumed, so re-running the same command
   continues the sweep where it stopped;
4. collect each candidate's numbers from its own ``manifest.json``, ``eval.json`` and
   ``metrics.jsonl`` and write ``report.md``, ``report.html`` and ``report.json``.

Learning rates: the method named in the config keeps the config's ``train.lr`` and options; every other
method trains with its own recommended rate (``tunelab methods``) and default options, except that a
method whose options extend the config's method's (QLoRA's extend LoRA's) gets those options too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml
from rich.console import Console
from rich.markup import escape

from tunelab import safeyaml
from tunelab.atomic import write_text_atomic
from tunelab.compare.report import write_report
from tunelab.compare.results import CandidateResult
from tunelab.config.load import resolved_dict
from tunelab.config.schema import RunConfig
from tunelab.errors import TunelabError
from tunelab.methods import get_method, method_names
from tunelab.resolve import load_config, resolve_tree
from tunelab.runs import read_run_config
from tunelab.runs.manifest import Manifest, read_manifest
from tunelab.stages.defaults import unset_keys

BASELINE_CANDIDATES = ("zero_shot", "few_shot", "rag")
DEFAULT_SHOTS = 3  # k for few_shot / rag when the config does not set eval.few_shot / eval.rag
SWEEP_KIND = "tunelab-sweep"  # sweep.yaml's ``kind``: marks a directory this command may write and clear in
# What the trainer writes in a run directory before its manifest.json: the resolved config, and the
# temporary files (".NAME.<random>", tunelab.atomic) an atomic write interrupted by a crash leaves. A candidate
# folder without a manifest is cleared only when it holds nothing else.
_BEFORE_MANIFEST = ("config.yaml",)
_ATOMIC_LEFTOVERS = (".config.yaml.", ".manifest.json.")


def candidate_names() -> list[str]:
    return list(BASELINE_CANDIDATES) + method_names()


def parse_candidates(spec: str | None) -> list[str]:
    """``"zero_shot,lora,full"`` -> validated list (all candidates when None)."""
    names = [n.strip() for n in spec.split(",") if n.strip()] if spec else candidate_names()
    unknown = [n for n in names if n not in candidate_names()]
    if unknown:
        raise TunelabError(f"--methods: unknown candidate(s) {', '.join(unknown)}; choose from {', '.join(candidate_names())}")
    if len(set(names)) != len(names):
        raise TunelabError("--methods: a candidate is listed twice")
    return names


def default_sweep_dir(config: RunConfig) -> Path:
    out = Path(config.output_dir)
    return out.parent / f"compare-{out.name}"


def run_compare(config_path: Path, overrides: list[str], candidates: list[str], sweep_dir: Path | None = None,
                console: Console | None = None) -> Path:
    """Run (or continue) the sweep and write its report; returns the sweep directory."""
    console = console or Console(stderr=True)
    # 1. Validate.
    config = load_config(config_path, overrides)
    if not config.data.eval_files():
        raise TunelabError("tunelab compare needs held-out data to score candidates on: set data.eval")
    from tunelab.stages.evaluation import check_eval_settings
    from tunelab.stages.setup import read_examples

    examples = read_examples(config)
    check_eval_settings(config, examples)
    sweep_dir = Path(sweep_dir or default_sweep_dir(config))
    _check_sweep_dir(sweep_dir)
    trained = [c for c in candidates if c not in BASELINE_CANDIDATES]
    before_path = sweep_dir / "untuned" / "eval_before.json"
    _check_candidates(config, trained, sweep_dir, before_path, examples)
    write_text_atomic(sweep_dir / "sweep.yaml", yaml.safe_dump(
        {"kind": SWEEP_KIND, "config": str(config_path), "overrides": overrides, "candidates": candidates}, sort_keys=False))

    # 2. The untuned model, once (again where the eval settings changed).
    started = time.time()
    _evaluate_untuned(_untuned_config(config, candidates), examples, before_path.parent, console)

    # 3. Each trained candidate in its own process.
    durations: list[float] = []
    for index, name in enumerate(trained, 1):
        eta = _eta(durations, len(trained) - index + 1)
        console.rule(f"[bold]candidate {index}/{len(trained)}: {name}[/]" + (f"  (sweep ETA {eta})" if eta else ""))
        seconds = _train_candidate(config, config_path, overrides, name, sweep_dir, before_path, console, f"{name} {index}/{len(trained)}")
        if seconds is not None:
            durations.append(seconds)

    # 4. Collect and report.
    before = json.loads(before_path.read_text())
    results = [_baseline_result(name, before, config) for name in candidates if name in BASELINE_CANDIDATES]
    results += [_trained_result(name, sweep_dir / name, config) for name in trained]
    meta = {
        "model": config.model.path, "config": str(config_path), "overrides": overrides, "metric": config.eval.metric,
        "eval_examples": len(examples.eval[: config.eval.limit] if config.eval.limit else examples.eval),
        "train_examples": len(examples.train),
        "budget": _budget(config, sweep_dir, trained), "device": _device(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "sweep_seconds_this_invocation": round(time.time() - started, 1),
    }
    md, html = write_report(sweep_dir, results, meta)
    console.print(f"Report: [bold]{escape(str(md))}[/] and [bold]{escape(str(html))}[/]")
    return sweep_dir


def _check_sweep_dir(sweep_dir: Path) -> None:
    """Refuse an ``--out`` that already holds files and is not a sweep: the sweep writes and deletes in it."""
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise TunelabError(f"--out {sweep_dir} is a file; give a directory for the sweep")
    if not sweep_dir.is_dir() or not any(sweep_dir.iterdir()):
        return
    marker = sweep_dir / "sweep.yaml"
    try:
        kind = (safeyaml.load(safeyaml.read_text(marker), str(marker)) or {}).get("kind") if marker.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError, TunelabError):
        kind = None
    if kind != SWEEP_KIND:
        raise TunelabError(
            f"--out {sweep_dir} already holds files and is not a tunelab sweep (no sweep.yaml with kind: {SWEEP_KIND}); "
            "tunelab compare writes candidate folders there and clears its own failed attempts, so give it a new or "
            f"empty directory. A sweep made by an older tunelab: add the line `kind: {SWEEP_KIND}` to its sweep.yaml")


def _check_candidates(config: RunConfig, trained: list[str], sweep_dir: Path, before_path: Path, examples) -> None:
    """Before anything runs: a candidate folder already in the sweep must be the sweep's own, made from the
    same config, and, once finished, scored with the current eval settings (its eval.json is reused as is)."""
    from tunelab.stages.evaluation import eval_settings

    current = eval_settings(config, examples)
    for name in trained:
        run_dir = sweep_dir / name
        if not run_dir.exists():
            continue
        manifest = read_manifest(run_dir) if run_dir.is_dir() else None
        if manifest is None:
            _refuse_unknown_files(run_dir)
            continue
        _check_same_candidate(run_dir, manifest, candidate_tree(config, name, run_dir, before_path))
        if manifest.status == "finished" and (run_dir / "eval.json").is_file():
            _check_same_scoring(name, run_dir, current)


def _check_same_scoring(name: str, run_dir: Path, current: dict) -> None:
    """A finished candidate's scores must have been made as the baselines of this invocation are."""
    from tunelab.stages.evaluation import settings_differences

    try:
        recorded = json.loads((run_dir / "eval.json").read_text()).get("settings")
    except (OSError, ValueError, AttributeError) as exc:
        raise TunelabError(f"{run_dir / 'eval.json'} cannot be read ({exc}); delete {run_dir} to train {name} again") from None
    if isinstance(recorded, dict):
        differences = settings_differences(recorded, current, ("model", "task", "probe"))
    else:
        differences = ["its eval.json records no evaluation settings (written by an older tunelab)"]
    if differences:
        raise TunelabError(
            f"{name} was scored with other evaluation settings than this sweep's ({'; '.join(differences[:5])}), so its "
            f"scores would not compare with baselines scored now. Run with the eval.* settings it was scored with, "
            f"pass a new --out, or delete {run_dir} to train it again")


def _refuse_unknown_files(run_dir: Path) -> None:
    """Refuse a candidate path without a manifest that holds anything the trainer does not write that early."""
    if not run_dir.is_dir():
        unknown = ["it is a file"]
    else:
        unknown = sorted(p.name for p in run_dir.iterdir() if not _trainer_file(p))
    if unknown:
        listed = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise TunelabError(f"{run_dir} holds no run (no manifest.json) but things the sweep did not write ({listed}); "
                           "the sweep never deletes those: move them away, or pass a new --out")


def _trainer_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink() and (path.name in _BEFORE_MANIFEST or path.name.startswith(_ATOMIC_LEFTOVERS))


def _clear_unfinished_attempt(run_dir: Path) -> None:
    """Remove a candidate folder an attempt left before writing its manifest, file by file: only the files
    the trainer writes that early; a folder holding anything else is refused and left as it is."""
    _refuse_unknown_files(run_dir)
    for entry in run_dir.iterdir():
        entry.unlink()
    run_dir.rmdir()


def _untuned_config(config: RunConfig, candidates: list[str]) -> RunConfig:
    """The config the untuned model is evaluated with: zero-shot, and k-shot / RAG where they are candidates."""
    shots = config.eval.few_shot or DEFAULT_SHOTS
    k = config.eval.rag or DEFAULT_SHOTS
    eval_cfg = config.eval.model_copy(update={"before": True, "few_shot": shots if "few_shot" in candidates else 0,
                                              "rag": k if "rag" in candidates else 0, "before_from": None})
    return config.model_copy(update={"eval": eval_cfg})


def _evaluate_untuned(config: RunConfig, examples, untuned_dir: Path, console: Console) -> None:
    """Evaluate on the untuned model what ``untuned/eval_before.json`` lacks or scored with other settings."""
    from tunelab.evaluation.run import LoadedModel
    from tunelab.stages.evaluation import evaluate_before, plan_before, save_before
    from tunelab.stages.setup import load_base_model, load_prepared_tokenizer

    if not plan_before(config, examples, untuned_dir).todo and (untuned_dir / "eval_before.json").is_file():
        return
    console.rule("[bold]untuned model: baselines and forgetting probe")
    import torch

    model_path, tokenizer, added = load_prepared_tokenizer(config)
    model = load_base_model(config, model_path, tokenizer, added, "cuda" if torch.cuda.is_available() else "cpu")
    untuned_dir.mkdir(parents=True, exist_ok=True)
    result = evaluate_before(config, LoadedModel(model, tokenizer, "untuned"), examples, untuned_dir, console)
    save_before(untuned_dir, result)


def candidate_tree(config: RunConfig, name: str, run_dir: Path, before_path: Path) -> dict:
    """The candidate's config: the base config with this method, its learning rate, and shared baselines."""
    tree = resolved_dict(config)
    base_method = dict(tree["method"])
    options = {k: v for k, v in base_method.items() if k != "name"}
    method = get_method(name)
    # Options carry over only to a method whose options extend the config's method's (LoRA's to QLoRA):
    # the same key means the same thing there, and nowhere else (target_modules differs per method).
    related = issubclass(method.options_class, get_method(base_method["name"]).options_class)
    carried = {k: v for k, v in options.items() if related and k in method.options_class.model_fields}
    tree["method"] = {"name": name, **carried}
    if base_method["name"] != name:
        tree["train"]["lr"] = method.default_lr
    for key in unset_keys(config):  # left to the data-chosen defaults: each candidate chooses its own
        section, option = key.split(".")
        tree[section].pop(option, None)
    for feature in method.incompatible:  # run features the method refuses ("packing", ...) are train.* keys
        tree["train"][feature] = False
    tree["output_dir"] = str(run_dir)
    tree["eval"].update(few_shot=0, rag=0, before=True, before_from=str(before_path))
    return tree


def _train_candidate(config: RunConfig, config_path: Path, overrides: list[str], name: str, sweep_dir: Path,
                     before_path: Path, console: Console, label: str) -> float | None:
    """Train one candidate (or continue it); returns its duration, or None when it was already done / failed."""
    run_dir = sweep_dir / name
    manifest = read_manifest(run_dir)
    recorded = manifest is not None and bool(manifest.to_json())  # an empty {} manifest is no attempt to resume
    tree = candidate_tree(config, name, run_dir, before_path)  # checked against the folder by _check_candidates
    if recorded and manifest.status == "finished":
        console.print(f"{name}: finished earlier with the same config and eval settings, reusing {run_dir}")
        return None
    if run_dir.exists() and manifest is None:
        _clear_unfinished_attempt(run_dir)  # an attempt that died before writing anything useful
    config_file = sweep_dir / "configs" / f"{name}.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(config_file, yaml.safe_dump(tree, sort_keys=False))
    command = [sys.executable, "-m", "tunelab.cli", "train", str(config_file)] + (["--resume"] if recorded else [])
    started = time.time()
    log_path = sweep_dir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        env = {**os.environ, "COLUMNS": "160"}  # the child's output is a pipe: keep its lines whole
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
        try:
            for line in process.stdout:
                log.write(line)
                console.print(f"[dim]\\[{escape(label)}][/] {escape(line.rstrip())}", highlight=False, markup=True, soft_wrap=True)
            code = process.wait()
        except KeyboardInterrupt:
            process.terminate()
            process.wait()
            raise
    if code != 0:
        console.print(f"[red]{name} failed (exit status {code}); its output is in {escape(str(log_path))}. The sweep goes on.[/]")
        return None
    return time.time() - started


def _check_same_candidate(run_dir: Path, manifest: Manifest, tree: dict) -> None:
    """A candidate already in the sweep directory must have been made from the same config."""
    from tunelab.config.load import config_differences, config_hash

    resolved, recorded = resolved_dict(resolve_tree(tree)), read_run_config(run_dir)
    for key in manifest.defaults_chosen or {}:  # left to the data: the run's choice, as its config.yaml holds it
        section, option = key.split(".")
        if option in (recorded.get(section) or {}):
            resolved[section][option] = recorded[section][option]
    if manifest.config_hash == config_hash(resolved):
        return
    differences = "; ".join(config_differences(recorded, resolved)[:5]) or "config hash differs"
    raise TunelabError(f"{run_dir} was trained with a different config ({differences}); this sweep directory belongs to "
                       "another comparison: pass a new --out, or delete that candidate to retrain it")


def _eta(durations: list[float], remaining: int) -> str | None:
    if not durations:
        return None
    seconds = sum(durations) / len(durations) * remaining
    return f"~{seconds / 60:.0f} min" if seconds >= 90 else f"~{seconds:.0f} s"


def _baseline_result(name: str, before: dict, config: RunConfig) -> CandidateResult:
    entry = before.get(name)
    if entry is None:
        return CandidateResult.from_dict({"name": name, "kind": "baseline", "status": "skipped", "metric": config.eval.metric,
                                          "error": "not evaluated (no eval examples?)"})
    return CandidateResult.from_dict({
        "name": name, "kind": "baseline", "status": "finished", "run_dir": None, "metric": config.eval.metric,
        "score": entry["score"], "retention": None, "probe_lost": [], "trainable_parameters": 0, "artifact_mb": 0.0,
        "train_seconds": 0.0, "eval_seconds": entry.get("seconds"),
    })


def _trained_result(name: str, run_dir: Path, config: RunConfig) -> CandidateResult:
    manifest = read_manifest(run_dir) or Manifest()
    eval_path = run_dir / "eval.json"
    if manifest.status != "finished" or not eval_path.is_file():
        log = run_dir.parent / "logs" / f"{name}.log"
        return CandidateResult.from_dict({"name": name, "kind": "trained", "status": "failed", "run_dir": str(run_dir),
                                          "metric": config.eval.metric, "error": _last_error(log)})
    report = json.loads(eval_path.read_text())
    forgetting = report.get("forgetting") or {}
    curve = []
    metrics = run_dir / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            curve.append((record["step"], record["loss"]))
    return CandidateResult.from_dict({
        "name": name, "kind": "trained", "status": "finished", "run_dir": str(run_dir), "metric": report["metric"],
        "score": report["tuned"]["score"] if "tuned" in report else None,
        "retention": forgetting.get("retention"), "probe_right_before": forgetting.get("right_before"),
        "probe_right_after": forgetting.get("right_after"), "probe_items": forgetting.get("items"),
        "probe_lost": [item["id"] for item in forgetting.get("lost", [])],
        "trainable_parameters": manifest.trainable_parameters, "total_parameters": manifest.total_parameters,
        "artifact_mb": manifest.artifact_mb, "peak_memory_mb": manifest.peak_memory_mb,
        "peak_memory_kind": manifest.peak_memory_kind, "train_seconds": manifest.train_seconds,
        "tokens_per_s": manifest.tokens_per_s, "loss_curve": curve,
        "eval_seconds": report.get("tuned", {}).get("seconds"),
    })


def _last_error(log: Path) -> str:
    if not log.is_file():
        return "did not run"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["failed"])[-1][-300:]


def _budget(config: RunConfig, sweep_dir: Path | None = None, trained: list[str] = ()) -> str:
    """The training budget as the report states it: the config's, or what each candidate chose from the data
    (read back from its resolved ``config.yaml``) where the config leaves epochs, batch or rate to the rule."""
    from tunelab.stages.defaults import unset_keys

    t = config.train
    order = f"same examples and order (seed {t.seed})"
    if sweep_dir is not None and unset_keys(config) & {"train.epochs", "train.batch_size", "train.lr"}:
        resolved = [(n, read_run_config(f.parent)["train"]) for n in trained if (f := sweep_dir / n / "config.yaml").is_file()]
        chosen = [f"{n} {_length(c.get('max_steps'), c['epochs'])} of batch {c['batch_size']} at lr {c['lr']:g}" for n, c in resolved]
        return f"chosen from the data by each candidate: {'; '.join(chosen) or 'none trained yet'}; {order}"
    length = _length(t.max_steps, t.epochs)
    if t.max_seconds:
        length = f"{t.max_seconds:g} s of training each (at most {length})"
    return f"same for every trained candidate: {length}, batch {t.batch_size} x accumulation {t.grad_accum}, {order}"


def _length(max_steps: int | None, epochs: float) -> str:
    return f"{max_steps} steps" if max_steps else f"{epochs:g} epoch(s)"


def _device() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import os

    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"
