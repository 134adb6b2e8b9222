"""The run directory's lifecycle: refuse to clobber a run, check a resume, keep the manifest's history."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tunelab.config.load import config_differences, config_hash
from tunelab.errors import TunelabError
from tunelab.runs import read_run_config, read_run_manifest
from tunelab.training.checkpoint import checkpoint_dirs
from tunelab.training.manifest import build_manifest


def check_run_dir(run_dir: Path, resume: bool, force: bool, resolved: dict, data_hash: str) -> tuple[Path | None, dict | None]:
    """Refuse to clobber a run or to resume a changed one.

    Returns:
        (newest checkpoint to resume from or None, the existing manifest or None).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise TunelabError(f"output_dir {run_dir} is a file; choose a directory path")
    manifest = read_run_manifest(run_dir)
    if not resume:
        if manifest is not None or (run_dir.is_dir() and any(run_dir.iterdir())):
            raise TunelabError(
                f"output_dir {run_dir} already holds files. Continue that run with --resume, "
                f"or choose a new directory (e.g. output_dir={run_dir}-2)."
            )
        return None, None
    if manifest is None:
        raise TunelabError(f"--resume: {run_dir} holds no run (no manifest.json); run without --resume to start one")
    problems = []
    if manifest.get("config_hash") != config_hash(resolved):
        old = read_run_config(run_dir)
        problems += [f"config changed: {d}" for d in config_differences(old, resolved)] or ["config changed"]
    if manifest.get("data_hash") != data_hash:
        problems.append("the training or evaluation data changed since the run started (content hash differs)")
    if problems and not force:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise TunelabError(
            f"refusing to resume {run_dir}:\n{listed}\nRestore the original config/data, start a new run in another "
            "output_dir, or pass --force to resume anyway (the result will then differ from an uninterrupted run)."
        )
    checkpoints = checkpoint_dirs(run_dir / "checkpoints")
    return (checkpoints[-1] if checkpoints else None), manifest


def new_manifest(previous: dict | None, resumed_from_step: int | None, **fields: Any) -> dict[str, Any]:
    """A manifest for this invocation; on resume the original creation time and provenance are kept
    and this invocation's code hash and commit are appended to ``resumed``."""
    current = build_manifest(status="running", **fields)
    if previous is None:
        return current
    history = list(previous.get("resumed", []))
    history.append({"at": current["created"], "from_step": resumed_from_step, "after": previous.get("status"),
                    "code_hash": current["code_hash"],
                    "git_commit": current["git_commit"], "versions": current["versions"],
                    **{k: current[k] for k in ("precision", "device") if k in current}})
    kept = {k: previous[k] for k in ("created", "code_hash", "git_commit", "versions") if k in previous}
    return {**current, **kept, "resumed": history}


def finish_manifest(manifest: dict[str, Any], **fields: Any) -> dict[str, Any]:
    manifest.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields)
    return manifest


def dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
