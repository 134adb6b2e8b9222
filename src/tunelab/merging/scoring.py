"""Score merged models the way the runs they came from were scored: each run's task, and the forgetting probe.

A run records in its ``config.yaml`` how its ``eval.json`` scores were made: the eval files read with the
run's data settings, ``eval.limit``, the metric and its options, ``max_new_tokens`` and ``batch_size``, and
the probe. A :class:`Task` rebuilds exactly that from the run directory, so a blend's or a merge's score on
a run's task compares with the run's own score; the probe is asked with ``tunelab.evaluation.report``'s
functions and retention is measured against the base model's answers, as training does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config.schema import EvalConfig
from tunelab.data import Example, load_examples
from tunelab.errors import TunelabError
from tunelab.evaluation.report import evaluate_task, load_probe, probe_answers, retention
from tunelab.evaluation.run import LoadedModel
from tunelab.runs import Run


@dataclass
class Task:
    """A run's evaluation task: its eval examples and the settings its scores were made with."""

    name: str
    run: Run
    examples: list[Example]
    settings: EvalConfig

    @property
    def metric(self) -> str:
        return self.settings.metric


def eval_settings_of(run: Run) -> EvalConfig:
    """The run's ``eval`` section as it trained with it (defaults filled in)."""
    return EvalConfig.model_validate(run.config.get("eval") or {})


def run_task(run: Run, name: str, limit: int | None = None) -> Task | None:
    """The task ``run`` was scored on, None when it had no ``data.eval``; ``limit`` keeps its first N examples only.

    Raises:
        TunelabError: The run's eval files are gone (moved or deleted since training).
    """
    files = (run.config.get("data") or {}).get("eval") or []
    files = [files] if isinstance(files, str) else list(files)
    if not files:
        return None
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise TunelabError(f"{run.path}: its eval data {', '.join(missing)} is not there any more; it is needed to score "
                           "merges on the run's task. Put the file back where the run's config.yaml (data.eval) says")
    settings = eval_settings_of(run)
    examples = load_examples(files, **run.data_settings())
    examples = examples[: settings.limit] if settings.limit else examples
    return Task(name, run, examples[:limit] if limit else examples, settings)


def run_probe(run: Run, limit: int | None = None) -> list[dict] | None:
    """The probe items the run was evaluated with (its first ``limit``), None when its probe was off."""
    items = load_probe(eval_settings_of(run).probe)
    return items[:limit] if items and limit else items


def score(loaded: LoadedModel, task: Task, label: str) -> dict[str, Any]:
    """``loaded``'s score on ``task``: ``{"metric", "score", "n"}`` (predictions are left out of merge reports)."""
    report = evaluate_task(loaded, task.examples, task.settings, label)
    return {"metric": report["metric"], "score": report["score"], "n": report["n"]}


@dataclass
class Probe:
    """The probe items and the base model's answers, which every retention is measured against."""

    items: list[dict]
    before: list[dict]
    batch_size: int = 16

    def measure(self, loaded: LoadedModel) -> dict[str, Any]:
        """Right answers, retention against the base and the ids of the items lost and gained."""
        after = probe_answers(loaded, self.items, self.batch_size)
        kept = retention(self.items, self.before, after)
        return {"right": kept["right_after"], "right_before": kept["right_before"], "items": kept["items"], "retention": kept["retention"],
                "lost": [item["id"] for item in kept["lost"]], "gained": kept["gained"]}


def base_probe(base: LoadedModel, items: list[dict] | None, batch_size: int = 16) -> Probe | None:
    """Ask the base model the probe (None when there is no probe)."""
    if not items:
        return None
    return Probe(items, probe_answers(base, items, batch_size), batch_size)
