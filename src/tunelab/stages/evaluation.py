"""The evaluation stages of a training run: the untuned model before, the tuned model after.

Before training: the task metric on ``data.eval`` (zero-shot), optional k-shot and RAG baselines, and the
forgetting probe, saved to ``eval_before.json`` with the settings that decided each score
(:func:`eval_settings`). After training: the same on the tuned model, compared in ``eval.json`` and printed
side by side.

``eval.*`` keys may change on ``--resume``, and ``tunelab compare`` shares one untuned evaluation between
its candidates (``eval.before_from``), so a saved result is reused only when the settings recorded with it
equal the current ones; otherwise it is evaluated again and the console says why. Baselines and tuned
scores are therefore always scored the same way.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tunelab.atomic import write_text_atomic
from tunelab.training.distributed import is_main
from tunelab.config.schema import RunConfig
from tunelab.data import data_fingerprint
from tunelab.evaluation.report import (PROBE_MAX_NEW_TOKENS, draw_shots, evaluate_task, few_shot_examples, load_probe,
                                       probe_answers, retention, describe_retention)
from tunelab.evaluation.run import LoadedModel
from tunelab.errors import TunelabError
from tunelab.stages.setup import Examples

BASELINES = ("zero_shot", "few_shot", "rag")  # the untuned model answering without / with examples in its prompt
# The parts of eval_settings() each untuned result depends on: the probe does not use the task metric.
DEPENDS_ON = {"zero_shot": ("model", "task"), "few_shot": ("model", "task", "few_shot"), "rag": ("model", "task", "rag"),
              "probe": ("model", "probe")}


def check_eval_settings(config: RunConfig, examples: Examples | None = None) -> None:
    """Fail before training on an unknown metric, missing metric options, a bad probe file, or an
    ``eval.before_from`` file scored with other settings than this run's (checked against ``examples``, the
    recipe's task examples, when it passes them; else when the untuned model is evaluated)."""
    from tunelab.evaluation.metrics import score

    if config.data.eval_files() or (examples is not None and examples.eval):
        score(config.eval.metric, [], [], **config.eval.metric_options())
    load_probe(probe_spec(config))
    if config.eval.rag_documents and not Path(config.eval.rag_documents).is_dir():
        raise TunelabError(f"eval.rag_documents: {config.eval.rag_documents} is not a folder; give a folder of .txt/.md files")
    if config.eval.before_from and examples is not None:
        plan_before(config, examples, Path(config.output_dir))


def probe_spec(config: RunConfig) -> bool | str:
    """``eval.probe`` with ``true`` resolved: the built-in chat probe, or the continuation probe for a base model
    that ships no chat template (it was never taught to answer a chat turn, so the chat probe would measure nothing)."""
    if config.eval.probe is True and not ships_chat_template(config.model.path, config.model.trust_remote_code):
        return "completion"
    return config.eval.probe


@functools.lru_cache(maxsize=8)
def ships_chat_template(model: str, trust_remote_code: bool = False) -> bool:
    from tunelab.models.load import load_tokenizer, resolve_model_path

    return bool(load_tokenizer(resolve_model_path(model), trust_remote_code=trust_remote_code).chat_template)


def _eval_examples(config: RunConfig, examples: Examples):
    return examples.eval[: config.eval.limit] if config.eval.limit else examples.eval


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:16]


def _messages_digest(examples) -> str:
    return _digest([list(example.messages) for example in examples])


def eval_settings(config: RunConfig, examples: Examples) -> dict[str, Any]:
    """What decides the untuned and tuned scores, in parts (see ``DEPENDS_ON``).

    ``model``: the base model and chat template. ``task`` (zero-shot and tuned scores): metric, metric options
    (with the content hash of an option naming a file, such as sql_exec's ``db``), ``max_new_tokens``, and the
    count and content hash of the eval examples scored (so ``eval.limit``, the data and its formatting are all
    covered). ``few_shot``: k and the shots drawn. ``rag``: k and what is retrieved from. ``probe``: its items'
    content hash. ``batch_size`` is left out: greedy answers do not depend on it. Parts a config does not
    ask for are absent.
    """
    cfg = config.eval
    settings: dict[str, Any] = {"model": {"path": config.model.path, "dtype": config.model.dtype,
                                          "chat_template": config.data.chat_template}}
    task_examples = _eval_examples(config, examples)
    if task_examples:
        options = cfg.metric_options()
        files = {k: data_fingerprint([v])[:16] for k, v in options.items() if isinstance(v, str) and Path(v).is_file()}
        settings["task"] = {"metric": cfg.metric, "options": options, "option_files": files,
                            "max_new_tokens": cfg.max_new_tokens, "examples": len(task_examples),
                            "examples_hash": _messages_digest(task_examples)}
        if cfg.few_shot:
            shots = draw_shots(examples.train, cfg.few_shot, seed=config.train.seed)
            settings["few_shot"] = {"k": cfg.few_shot, "shots_hash": _messages_digest(shots)}
        if cfg.rag:
            corpus = data_fingerprint([cfg.rag_documents])[:16] if cfg.rag_documents else _messages_digest(examples.train)
            settings["rag"] = {"k": cfg.rag, "documents": cfg.rag_documents, "corpus_hash": corpus}
    probe = load_probe(probe_spec(config))
    if probe:
        settings["probe"] = {"items": len(probe), "items_hash": _digest(probe), "max_new_tokens": PROBE_MAX_NEW_TOKENS}
    return json.loads(json.dumps(settings, default=str))  # as it reads back from a file (tuples become lists)


def settings_differences(recorded: dict, current: dict, parts: tuple[str, ...]) -> list[str]:
    """``"task.metric: 'exact_match' → 'contains'"`` for each setting of ``parts`` that differs."""
    out = []
    for part in parts:
        old, new = recorded.get(part) or {}, current.get(part) or {}
        out += [f"{part}.{key}: {old.get(key)!r} → {new.get(key)!r}" for key in sorted(set(old) | set(new))
                if old.get(key) != new.get(key)]
    return out


def _wanted(config: RunConfig, settings: dict) -> list[str]:
    """The untuned results this run shows."""
    names = ["zero_shot"] + [k for k in ("few_shot", "rag") if k in settings] if "task" in settings and config.eval.before else []
    return names + (["probe"] if "probe" in settings else [])


@dataclass
class BeforePlan:
    """Saved untuned results to reuse (``kept``, with their ``settings``), those to evaluate (``todo``) and why."""

    kept: dict[str, Any]
    todo: list[str]
    why: list[str]
    source: Path | None


def plan_before(config: RunConfig, examples: Examples, run_dir: Path) -> BeforePlan:
    """Decide which untuned results saved earlier can be reused; nothing is loaded or evaluated.

    The run's own ``eval_before.json`` comes first, then ``eval.before_from``; a result is reused only
    when the settings recorded with it equal this run's (:func:`eval_settings`).

    Raises:
        TunelabError: ``eval.before_from`` names a file scored another way. It is refused rather than
            evaluated again because the key asks for that file to be reused: silently ignoring it would
            cost the time it was meant to save and hide that the shared baselines are not this run's.
    """
    current = eval_settings(config, examples)
    wanted = _wanted(config, current)
    own_path = run_dir / "eval_before.json"
    own = _compare(_read_before(own_path, str(own_path)), current, wanted, own_path) if own_path.is_file() else None
    if (own and not own.todo) or not config.eval.before_from:
        return own or BeforePlan({"settings": current}, wanted, [], None)
    shared_path = Path(config.eval.before_from)
    shared = _compare(_read_before(shared_path, "eval.before_from"), current, wanted, shared_path)
    if shared.todo:
        raise TunelabError(
            f"eval.before_from: {shared_path} cannot be reused, it was scored with other evaluation settings than "
            f"this run's ({'; '.join(shared.why)}), so its baselines would not compare with this run's scores. Set the "
            "eval.* keys as in the run that wrote it (eval.batch_size may differ), or remove eval.before_from to "
            "evaluate the untuned model in this run")
    return shared


def _read_before(path: Path, what: str) -> dict[str, Any]:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TunelabError(f"{what}: cannot read {path}: {exc}") from None
    if not isinstance(saved, dict):
        raise TunelabError(f"{what}: {path} is not an eval_before.json (expected a JSON object)")
    return saved


def _compare(saved: dict, current: dict, wanted: list[str], path: Path) -> BeforePlan:
    recorded = saved.get("settings")
    if not isinstance(recorded, dict):
        return BeforePlan({"settings": current}, wanted, ["it records no evaluation settings (written by an older tunelab)"], path)
    kept: dict[str, Any] = {}
    todo, why = [], []
    for name in wanted:
        differences = settings_differences(recorded, current, DEPENDS_ON[name]) if name in saved else [f"it has no {name} result"]
        if differences:
            todo.append(name)
            why += differences
        else:
            kept[name] = saved[name]
    settings = dict(current)
    for name in BASELINES:  # one this run does not ask for stays if it was scored on the same model and task
        if (name not in wanted and name in saved and name in recorded
                and not settings_differences(recorded, current, ("model", "task"))):
            kept[name], settings[name] = saved[name], recorded[name]
    kept["settings"] = settings
    return BeforePlan(kept, todo, list(dict.fromkeys(why)), path)


def evaluate_before(config: RunConfig, loaded: LoadedModel, examples: Examples, run_dir: Path, console: Console) -> dict[str, Any]:
    """Evaluate the untuned model, reusing the results saved earlier that were scored the same way (:func:`plan_before`).
    With several processes only rank 0 evaluates (the others get ``{}``)."""
    if not is_main():
        return {}
    plan = plan_before(config, examples, run_dir)
    if plan.todo and plan.why:
        console.print(f"[yellow]{escape(str(plan.source))}[/] cannot be reused as it is: {escape('; '.join(plan.why))}. "
                      f"Evaluating the untuned model again: {', '.join(plan.todo)}.", soft_wrap=True)
    result, todo = dict(plan.kept), set(plan.todo)
    task_examples = _eval_examples(config, examples)
    if "zero_shot" in todo:
        console.print(f"Evaluating the untuned model on {len(task_examples)} eval examples ({config.eval.metric}) ...")
        result["zero_shot"] = evaluate_task(loaded, task_examples, config.eval, "untuned, zero-shot")
    if "few_shot" in todo:
        console.print(f"Evaluating the untuned model {config.eval.few_shot}-shot ...")
        shots = few_shot_examples(task_examples, _task_train(config, examples), config.eval.few_shot, seed=config.train.seed)
        result["few_shot"] = evaluate_task(loaded, shots, config.eval, f"untuned, {config.eval.few_shot}-shot")
    if "rag" in todo:
        from tunelab.evaluation.rag import rag_examples

        console.print(f"Evaluating the untuned model with retrieval (top-{config.eval.rag}) ...")
        retrieved = rag_examples(task_examples, examples.train, config.eval.rag, config.eval.rag_documents)
        source = config.eval.rag_documents or "train examples"
        result["rag"] = evaluate_task(loaded, retrieved, config.eval, f"untuned, RAG top-{config.eval.rag} from {source}")
    if "probe" in todo:
        probe = load_probe(probe_spec(config))
        console.print(f"Running the forgetting probe ({len(probe)} questions) on the untuned model ...")
        result["probe"] = probe_answers(loaded, probe, config.eval.batch_size)
    return result


def _task_train(config: RunConfig, examples: Examples) -> list:
    """The training examples of the task itself: the shots of a k-shot baseline never come from ``data.replay``."""
    replay = config.data.replay
    return [e for e in examples.train if not (replay and e.source.startswith(f"{replay.path}:"))]


def save_before(run_dir: Path, before: dict[str, Any]) -> None:
    """Keep the untuned model's results (and their ``settings``) so a resumed run need not evaluate it again."""
    if is_main():
        write_text_atomic(run_dir / "eval_before.json", json.dumps(before, indent=2, ensure_ascii=False) + "\n")


def evaluate_after(config: RunConfig, loaded: LoadedModel, examples: Examples, before: dict, run_dir: Path, console: Console,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate the tuned model, compare with ``before``, write ``eval.json`` and print the comparison.

    ``eval.json`` records the settings its scores were made with (``settings``), as ``eval_before.json`` does;
    ``extra`` adds a recipe's own results (e.g. the pretrain recipe's held-out perplexity before and after).
    With several processes only rank 0 evaluates (the others get ``{}``).
    """
    if not is_main():
        return {}
    report: dict[str, Any] = {"metric": config.eval.metric, "baselines": {}, **(extra or {})}
    for key in BASELINES:
        if key in before:
            report["baselines"][key] = before[key]
    task_examples = _eval_examples(config, examples)
    if task_examples:
        console.print(f"Evaluating the tuned model on {len(task_examples)} eval examples ...")
        report["tuned"] = evaluate_task(loaded, task_examples, config.eval, "tuned")
    probe = load_probe(probe_spec(config))
    if probe and "probe" in before:
        after = probe_answers(loaded, probe, config.eval.batch_size)
        report["forgetting"] = {**retention(probe, before["probe"], after), "before": before["probe"], "after": after}
    report["settings"] = {**before.get("settings", {}), **eval_settings(config, examples)}
    write_text_atomic(run_dir / "eval.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print_comparison(report, Console())
    return report


def print_comparison(report: dict[str, Any], console: Console) -> None:
    """The table of baselines, tuned score and probe retention; the probe items lost."""
    table = Table(title=f"What the fine-tune learned ({report['metric']}) and forgot (general probe)")
    table.add_column("")
    table.add_column("score", justify="right")
    for key in BASELINES:
        if key in report["baselines"]:
            table.add_row(report["baselines"][key]["label"], f"{report['baselines'][key]['score']:.3f}")
    if "tuned" in report:
        table.add_row("[bold]tuned", f"[bold]{report['tuned']['score']:.3f}")
    forgetting = report.get("forgetting")
    if forgetting:
        table.add_row("probe right, untuned → tuned", f"{forgetting['right_before']} → {forgetting['right_after']} of {forgetting['items']}")
        table.add_row("probe retention", describe_retention(forgetting))
    console.print(table)
    if forgetting and forgetting["lost"]:
        console.print("Lost probe items: " + ", ".join(f"{item['id']} ({item['after'][:30]!r})" for item in forgetting["lost"]),
                      markup=False)
    if forgetting and forgetting.get("unpaired"):
        console.print("[yellow]Not counted[/] (asked only before or only after training, or as another question): "
                      + escape(", ".join(forgetting["unpaired"])))
