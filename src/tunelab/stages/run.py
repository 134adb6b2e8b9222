"""A run directory from start to finish: check it can be (re)started, describe it, save the artifact, close it.

Every recipe goes through the same steps, so every run directory holds the same files: ``config.yaml``
(the fully resolved config), ``manifest.json`` (hashes, versions, precision, device, costs, status),
``metrics.jsonl``, ``checkpoints/``, the artifact folder and the evaluation results.

The manifest (:class:`tunelab.runs.manifest.Manifest`) says how the run stands: ``running`` from
:func:`begin_run`, ``finished`` from :func:`finish_run`, and ``failed`` or ``interrupted`` (with the ``failure``
reason) when anything ends it in between; :func:`failures_recorded`, which every registered recipe runs
inside, and :func:`failure_recorded`, around a recipe's loop, see to the last two.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file
from torch import nn

from tunelab.atomic import atomic_dir, describe_disk_full, disk_full, write_text_atomic
from tunelab.config.load import config_differences, config_hash, resolved_dict
from tunelab.config.schema import RunConfig
from tunelab.data import data_fingerprint
from tunelab.data.templates import template_file
from tunelab.errors import TunelabError
from tunelab.methods import TuningMethod
from tunelab.runs import dir_size_mb, read_run_config
from tunelab.runs.manifest import Manifest, new_manifest, now, read_manifest, write_manifest
from tunelab.stages.lineage import parent_inputs, read_parent
from tunelab.training.distributed import barrier, is_main, launched_world

_OPEN: dict[Path, Manifest] = {}  # runs this process began and has not ended: run dir -> its manifest


@dataclass
class RunStart:
    """What was checked before anything expensive: where the run goes and what it resumes from."""

    run_dir: Path
    resolved: dict[str, Any]
    data_files: list[str]
    data_hash: str
    resume: bool
    previous: Manifest | None  # the existing manifest, when resuming


def hashed_inputs(config: RunConfig) -> list[str]:
    """Files whose content decides the training result: the data, and a chat template given as a file."""
    files = config.data.train_files() + config.data.eval_files()
    if template_file(config.data.chat_template):
        files.append(config.data.chat_template)
    return files


def check_start(config: RunConfig, *, resume: bool, force: bool, precision: str, device_kind: str,
                data_files: list[str] | None = None) -> RunStart:
    """Refuse to clobber a run, or to resume one whose config, data, precision or device kind changed (unless ``force``)."""
    run_dir = Path(config.output_dir)
    files = (data_files if data_files is not None else hashed_inputs(config)) + parent_inputs(read_parent(config))
    resolved = resolved_dict(config)
    data_hash = data_fingerprint(files)
    previous = check_run_dir(run_dir, resume, force, resolved, data_hash)
    if previous is not None and not force:
        _check_same_machine_kind(run_dir, previous, precision, device_kind)
        _check_same_processes(run_dir, previous, config)
    return RunStart(run_dir, resolved, files, data_hash, resume, previous)


def check_run_dir(run_dir: Path, resume: bool, force: bool, resolved: dict, data_hash: str) -> Manifest | None:
    """Refuse to clobber a run or to resume a changed one; returns the existing manifest when resuming, else None."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TunelabError(f"output_dir {run_dir} is a file; choose a directory path")
    manifest = read_manifest(run_dir)
    if not resume:
        if manifest is not None or (run_dir.is_dir() and any(run_dir.iterdir())):
            raise TunelabError(
                f"output_dir {run_dir} already holds files. Continue that run with --resume, "
                f"or choose a new directory (e.g. output_dir={run_dir}-2)."
            )
        return None
    if manifest is None:
        raise TunelabError(f"--resume: {run_dir} holds no run (no manifest.json); run without --resume to start one")
    problems = []
    if manifest.config_hash != config_hash(resolved):
        old = read_run_config(run_dir)
        problems += [f"config changed: {d}" for d in config_differences(old, resolved)] or ["config changed"]
    if manifest.data_hash != data_hash:
        problems.append("the training or evaluation data changed since the run started (content hash differs)")
    if problems and not force:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise TunelabError(
            f"refusing to resume {run_dir}:\n{listed}\nRestore the original config/data, start a new run in another "
            "output_dir, or pass --force to resume anyway (the result will then differ from an uninterrupted run)."
        )
    return manifest


def _check_same_machine_kind(run_dir: Path, previous: Manifest, precision: str, device_kind: str) -> None:
    """A resume must compute in the precision and on the kind of device the run started with."""
    was_precision = {"no": "fp32"}.get(previous.precision, previous.precision)
    device = previous.device if "device" in previous.model_fields_set else ""
    was_kind = previous.device_kind or str(device).split(":")[0] or None
    changes = []
    if was_precision and was_precision != precision:
        changes.append(f"precision {was_precision} -> {precision}")
    if was_kind and was_kind != device_kind:
        changes.append(f"device {was_kind} -> {device_kind}")
    if changes:
        raise TunelabError(
            f"refusing to resume {run_dir}: {', '.join(changes)} (train.precision="
            f"{previous.precision_setting if 'precision_setting' in previous.model_fields_set else 'auto'} "
            "resolves differently on this machine). Resume where the run started, set train.precision to "
            f"{was_precision}, or pass --force to continue anyway (the result will differ from an uninterrupted run)."
        )


def processes(config: RunConfig) -> dict[str, Any]:
    """The manifest's record of how many processes train and how they share the model."""
    size = launched_world().size
    return {"processes": size, "distributed_strategy": config.distributed.strategy if size > 1 else None}


def _check_same_processes(run_dir: Path, previous: Manifest, config: RunConfig) -> None:
    """A resume runs on as many processes, sharing the model the same way, as the run started with: the global
    batch and the data each rank reads depend on it."""
    was = {"processes": previous.processes if "processes" in previous.model_fields_set else 1,
           "distributed_strategy": previous.distributed_strategy}
    now = processes(config)
    if was != now:
        raise TunelabError(f"refusing to resume {run_dir}: it started on {was['processes']} process(es)"
                           f"{' with ' + was['distributed_strategy'] if was['distributed_strategy'] else ''}, this is "
                           f"{now['processes']}{' with ' + now['distributed_strategy'] if now['distributed_strategy'] else ''}. "
                           f"Resume with --nproc {was['processes']}"
                           f"{' and distributed.strategy=' + was['distributed_strategy'] if was['distributed_strategy'] else ''}, "
                           "or pass --force to continue anyway (the result will differ from an uninterrupted run).")


def begin_run(start: RunStart, config: RunConfig, **fields: Any) -> Manifest:
    """Write ``config.yaml`` and a ``running`` manifest (rank 0 only); returns the manifest (kept up to date by the recipe)."""
    start_step = fields.pop("start_step", 0)
    manifest = new_manifest(start.previous, start_step if start.resume else None, config_hash=config_hash(start.resolved),
                            data_hash=start.data_hash, data_files=start.data_files,
                            precision_setting=config.train.precision, recipe=config.recipe.name, **processes(config),
                            **fields)
    if is_main():
        start.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(start.run_dir / "config.yaml", yaml.safe_dump(start.resolved, sort_keys=False))
        if "mlflow" in config.tracking:
            from tunelab.training.tracking import start_mlflow

            tags = {k: getattr(manifest, k) for k in ("config_hash", "data_hash", "code_hash", "git_commit", "recipe", "method")}
            previous_id = start.previous.mlflow_run_id if start.resume and start.previous else None
            manifest.mlflow_run_id = start_mlflow(start.run_dir, start.resolved, tags, config.tracking_uri, previous_id)
        write_manifest(start.run_dir, manifest)
        _OPEN[start.run_dir] = manifest
    return manifest


def _mirror(run_dir: Path, manifest: Manifest, status: str) -> None:
    """End the run's MLflow mirror (``tracking: [mlflow]``), if it has one."""
    if manifest.mlflow_run_id:
        from tunelab.training.tracking import finish_mlflow

        uri = read_run_config(run_dir).get("tracking_uri")
        finish_mlflow(run_dir, manifest.mlflow_run_id, uri, status)


@contextlib.contextmanager
def failure_recorded(run_dir: Path, manifest: Manifest) -> Iterator[None]:
    """Whatever ends the block (divergence, a full disk, Ctrl-C, a bug) marks the run failed or interrupted, and
    is re-raised: for a recipe called directly, outside :func:`failures_recorded`."""
    try:
        yield
    except BaseException as error:
        if is_main():
            _OPEN.setdefault(run_dir, manifest)
            record_failure(run_dir, error)
        raise


def failure_reason(error: BaseException) -> str:
    """What ended a run, in one line for the manifest's ``failure``."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C); continue with --resume"
    if not isinstance(error, TunelabError) and (full := disk_full(error)) is not None:
        return f"{describe_disk_full(full)}; free space and continue with --resume"
    text = str(error) if isinstance(error, TunelabError) else f"{type(error).__name__}: {error}"
    return text if len(text) <= 2000 else text[:2000] + " ..."


def record_failure(run_dir: Path, error: BaseException) -> None:
    """Mark ``run_dir`` ``failed`` (``interrupted`` on Ctrl-C) with the reason, if this process began it and has
    not ended it. Best effort: a full disk may refuse this write too, and the error that ended the run is the one
    to report, so nothing is raised from here."""
    manifest = _OPEN.pop(run_dir, None)
    if manifest is None:
        return
    interrupted = isinstance(error, KeyboardInterrupt)
    manifest.set(status="interrupted" if interrupted else "failed", failure=failure_reason(error), ended=now())
    with contextlib.suppress(Exception):
        write_manifest(run_dir, manifest)
    with contextlib.suppress(Exception):
        _mirror(run_dir, manifest, "KILLED" if interrupted else "FAILED")


@contextlib.contextmanager
def failures_recorded() -> Iterator[None]:
    """Runs begun inside and not finished when an exception leaves are marked failed or interrupted
    (:func:`record_failure`); runs begun before are left alone (a refused resume never touches a run)."""
    before = set(_OPEN)
    try:
        yield
    except BaseException as error:
        for run_dir in [d for d in _OPEN if d not in before]:
            record_failure(run_dir, error)
        raise


def save_artifact(run_dir: Path, method: TuningMethod, model: nn.Module, tokenizer,
                  extra_modules: dict[str, nn.Module]) -> tuple[Path, float]:
    """Write the artifact folder (``method.artifact``) atomically: the method's save of ``model``, the tokenizer and
    its chat template, and each of ``extra_modules``' weights (safetensors) in the file it is keyed by. Returns
    (its path, its size in MB). With several processes rank 0 writes it and the others wait until it is there."""
    artifact_dir = run_dir / method.artifact
    if is_main():
        with atomic_dir(artifact_dir) as tmp:
            method.save(model, tmp)
            for file, module in extra_modules.items():
                save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(tmp / file))
            tokenizer.save_pretrained(tmp)
            for path in tmp.rglob("*"):
                if path.is_file():
                    path.chmod(0o644)  # safetensors writes 0600; an artifact is meant to be read by others (a server, a colleague)
    barrier()
    return artifact_dir, round(dir_size_mb(artifact_dir), 3)


def finish_run(run_dir: Path, manifest: Manifest, **fields: Any) -> None:
    """Mark the run ``finished`` with ``fields`` (its costs and results) and end its MLflow mirror (rank 0 only)."""
    if is_main():
        write_manifest(run_dir, manifest.set(status="finished", finished=now(), **fields))
        _OPEN.pop(run_dir, None)
        _mirror(run_dir, manifest, "FINISHED")
