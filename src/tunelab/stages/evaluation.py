"""The evaluation stages of a training run: the untuned model before, the tuned model after.

Before training: the task metric on ``data.eval`` (zero-shot), an optional k-shot baseline, and the
forgetting probe, saved to ``eval_before.json`` (reused on ``--resume``). After training: the same on the
tuned model, compared in ``eval.json`` and printed side by side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tunelab.atomic import write_text_atomic
from tunelab.config.schema import RunConfig
from tunelab.evaluation.report import evaluate_task, few_shot_examples, load_probe, probe_answers, retention
from tunelab.evaluation.run import LoadedModel
from tunelab.errors import TunelabError
from tunelab.stages.setup import Examples

BASELINES = ("zero_shot", "few_shot", "rag")  # the untuned model answering without / with examples in its prompt


def check_eval_settings(config: RunConfig) -> None:
    """Fail before training on an unknown metric, missing metric options or a bad probe file."""
    from tunelab.evaluation.metrics import score

    if config.data.eval_files():
        score(config.eval.metric, [], [], **config.eval.metric_options())
    load_probe(config.eval.probe)
    if config.eval.rag_documents and not Path(config.eval.rag_documents).is_dir():
        raise TunelabError(f"eval.rag_documents: {config.eval.rag_documents} is not a folder; give a folder of .txt/.md files")
    if config.eval.before_from:
        _shared_before(Path(config.eval.before_from))


def _eval_examples(config: RunConfig, examples: Examples):
    return examples.eval[: config.eval.limit] if config.eval.limit else examples.eval


def evaluate_before(config: RunConfig, loaded: LoadedModel, examples: Examples, run_dir: Path, console: Console) -> dict[str, Any]:
    """Evaluate the untuned model, or read the results a previous invocation saved (``save_before``)."""
    path = run_dir / "eval_before.json"
    if path.is_file():
        return json.loads(path.read_text())
    if config.eval.before_from:
        return _shared_before(Path(config.eval.before_from))
    result: dict[str, Any] = {}
    task_examples = _eval_examples(config, examples)
    if task_examples and config.eval.before:
        console.print(f"Evaluating the untuned model on {len(task_examples)} eval examples ({config.eval.metric}) ...")
        result["zero_shot"] = evaluate_task(loaded, task_examples, config.eval, "untuned, zero-shot")
        if config.eval.few_shot:
            console.print(f"Evaluating the untuned model {config.eval.few_shot}-shot ...")
            shots = few_shot_examples(task_examples, examples.train, config.eval.few_shot, seed=config.train.seed)
            result["few_shot"] = evaluate_task(loaded, shots, config.eval, f"untuned, {config.eval.few_shot}-shot")
        if config.eval.rag:
            from tunelab.evaluation.rag import rag_examples

            console.print(f"Evaluating the untuned model with retrieval (top-{config.eval.rag}) ...")
            retrieved = rag_examples(task_examples, examples.train, config.eval.rag, config.eval.rag_documents)
            source = config.eval.rag_documents or "train examples"
            result["rag"] = evaluate_task(loaded, retrieved, config.eval, f"untuned, RAG top-{config.eval.rag} from {source}")
    probe = load_probe(config.eval.probe)
    if probe:
        console.print(f"Running the forgetting probe ({len(probe)} questions) on the untuned model ...")
        result["probe"] = probe_answers(loaded, probe, config.eval.batch_size)
    return result


def _shared_before(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TunelabError(f"eval.before_from: cannot read {path}: {exc}") from None


def save_before(run_dir: Path, before: dict[str, Any]) -> None:
    """Keep the untuned model's results so a resumed run need not evaluate it again."""
    write_text_atomic(run_dir / "eval_before.json", json.dumps(before, indent=2, ensure_ascii=False) + "\n")


def evaluate_after(config: RunConfig, loaded: LoadedModel, examples: Examples, before: dict, run_dir: Path, console: Console) -> dict[str, Any]:
    """Evaluate the tuned model, compare with ``before``, write ``eval.json`` and print the comparison."""
    report: dict[str, Any] = {"metric": config.eval.metric, "baselines": {}}
    for key in BASELINES:
        if key in before:
            report["baselines"][key] = before[key]
    task_examples = _eval_examples(config, examples)
    if task_examples:
        console.print(f"Evaluating the tuned model on {len(task_examples)} eval examples ...")
        report["tuned"] = evaluate_task(loaded, task_examples, config.eval, "tuned")
    probe = load_probe(config.eval.probe)
    if probe and "probe" in before:
        after = probe_answers(loaded, probe, config.eval.batch_size)
        report["forgetting"] = {**retention(probe, before["probe"], after), "before": before["probe"], "after": after}
    write_text_atomic(run_dir / "eval.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print_comparison(report, Console())
    return report


def print_comparison(report: dict[str, Any], console: Console) -> None:
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
        table.add_row("probe retention", f"{forgetting['retention']:.0%}")
    console.print(table)
    if forgetting and forgetting["lost"]:
        console.print("Lost probe items: " + ", ".join(f"{item['id']} ({item['after'][:30]!r})" for item in forgetting["lost"]))
