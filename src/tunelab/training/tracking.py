"""Experiment trackers beside a run directory: TensorBoard (default, live) and MLflow (``tracking: [mlflow]``).

MLflow is the ``tracking`` extra (``mlflow-skinny`` with SQLAlchemy and Alembic for its SQLite store; imported
only when asked for). A run directory is the source of truth and MLflow its mirror: ``start_mlflow`` opens an
MLflow run when the tunelab run begins (the resolved config as params, flattened with dots; the config, data
and code hashes as tags) and records its id in the manifest, so a resumed run continues the same MLflow run;
``finish_mlflow`` logs the records of ``metrics.jsonl`` as step metrics (in batches; after a resume, only the
steps past those the first attempt mirrored), the run directory's
reports as artifacts (``eval.json``, ``eval_before.json``, ``config.yaml``, ``manifest.json``, merge and
export reports where present), and ends the MLflow run FINISHED or FAILED. The default store is
``sqlite:///<output_dir's parent>/mlflow.db`` with artifacts in ``<parent>/mlartifacts`` (MLflow 3's file
store is in maintenance mode and refuses to start unless told to); ``tracking_uri`` points anywhere else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

EXPERIMENT = "tunelab"
REPORTS = ("eval.json", "eval_before.json", "config.yaml", "manifest.json", "merge_report.json", "export_report.json")
BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call


def _mlflow():
    try:
        import mlflow
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TunelabError("tracking: mlflow needs MLflow; install it with: pip install 'tunelab[tracking]'") from None
    return mlflow, MlflowClient


def default_uri(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir).resolve().parent / 'mlflow.db')}"


def _flat(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(tree) if not isinstance(tree, str) else tree}


def _client(run_dir: Path, uri: str | None):
    import logging

    _, MlflowClient = _mlflow()
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store migrations log at INFO on every open
    return MlflowClient(uri or default_uri(run_dir))


def start_mlflow(run_dir: Path, resolved: dict[str, Any], tags: dict[str, Any], uri: str | None, resume_id: str | None) -> str:
    """Open (or, resuming, reopen) the MLflow run mirroring ``run_dir``; returns its id."""
    client = _client(run_dir, uri)
    if resume_id:
        client.update_run(resume_id, status="RUNNING")
        return resume_id
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        artifacts = (Path(run_dir).resolve().parent / "mlartifacts").as_uri() if uri is None else None
        experiment_id = client.create_experiment(EXPERIMENT, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=Path(run_dir).name, tags={k: str(v) for k, v in tags.items() if v is not None})
    from mlflow.entities import Param

    params = [Param(k, v[:6000]) for k, v in _flat(resolved).items()]
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start:start + 100])
    return run.info.run_id


def finish_mlflow(run_dir: Path, run_id: str, uri: str | None, status: str = "FINISHED") -> None:
    """Mirror ``metrics.jsonl`` and the reports into the MLflow run, then end it with ``status``."""
    from mlflow.entities import Metric

    client = _client(run_dir, uri)
    metrics, done = [], None
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = int(record.get("step", 0))
        values = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if done is None and values:  # a resumed run: what the first attempt mirrored is already there
            done = max((m.step for m in client.get_metric_history(run_id, next(iter(values)))), default=0)
        if step > (done or 0):
            metrics += [Metric(k, v, 0, step) for k, v in values.items()]
    for start in range(0, len(metrics), BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + BATCH])
    for name in REPORTS:
        if (Path(run_dir) / name).is_file():
            client.log_artifact(run_id, str(Path(run_dir) / name))
    client.set_terminated(run_id, status=status)
