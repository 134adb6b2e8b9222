"""What the dashboard shows, read from run directories under the roots it was given (nothing here writes).

A run is any folder under a root holding ``manifest.json`` (searched ``MAX_DEPTH`` levels deep, so pipeline
and compare folders are found). Its id is its path relative to its root, prefixed by the root's index
(``0/pipeline-sql/sft/run``); :func:`resolve` maps an id back and refuses anything outside the roots.

Symbolic links: the search never enters a linked folder (nor a hidden one), and looks at ``MAX_ENTRIES`` folder
entries at most, so a link to a system folder or a huge tree under a root cannot make each page walk it. A file of
a run (``manifest.json``, ``config.yaml``, ``metrics.jsonl``, ``eval.json``) is read only where it resolves inside
the roots (:meth:`Roots.readable`): a ``config.yaml`` linked to any file on disk is not shown. A run's files table
lists a link as an entry but neither follows nor sizes it.

Status: the manifest's (``running``, ``finished``, ``failed``), except that a ``running`` run whose files
have not changed for ``STALE_SECONDS`` is shown as ``interrupted`` (killed: nothing marks it).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.runs import Run, read_run_config, read_run_manifest
from tunelab.runs.manifest import Manifest

MAX_DEPTH = 4
MAX_ENTRIES = 100_000  # folder entries one search looks at, at most (all roots together)
STALE_SECONDS = 600


@dataclass(frozen=True)
class Roots:
    paths: tuple[Path, ...]

    @classmethod
    def of(cls, folders: list[str | Path]) -> "Roots":
        return cls(tuple(Path(f).resolve() for f in folders))

    def folder(self, folder_id: str) -> Path | None:
        """The folder ``folder_id`` (``INDEX/relative/path``) names, resolved (links followed), or None when that is
        not inside the root it names."""
        index, _, rel = folder_id.partition("/")
        if not index.isdigit() or int(index) >= len(self.paths):
            return None
        root = self.paths[int(index)]
        path = (root / rel).resolve()
        return path if path == root or root in path.parents else None

    def resolve(self, run_id: str) -> Path | None:
        """The run folder ``run_id`` names, or None when it is not a run inside one of the roots."""
        path = self.folder(run_id)
        return path if path is not None and (path / "manifest.json").is_file() else None

    def holds(self, path: Path) -> bool:
        """Whether ``path``, links followed, is a root or inside one."""
        resolved = Path(path).resolve()
        return any(resolved == root or root in resolved.parents for root in self.paths)

    def readable(self, path: Path) -> bool:
        """Whether ``path`` is a file that, links followed, lies inside the roots (what the dashboard may read)."""
        return Path(path).is_file() and self.holds(path)

    def run_id(self, path: Path) -> str:
        for index, root in enumerate(self.paths):
            if path == root or root in path.parents:
                return f"{index}/{path.relative_to(root).as_posix()}".rstrip("/.") or f"{index}"
        raise ValueError(f"{path} is outside the roots")


def folders(roots: Roots) -> list[Path]:
    """Every folder under the roots, ``MAX_DEPTH`` levels down at most, in sorted order; links and hidden folders are
    not entered, nor the inside of a run directory, and the search stops after ``MAX_ENTRIES`` entries."""
    found: list[Path] = []
    budget = [MAX_ENTRIES]

    def children(folder: Path) -> list[Path]:
        out = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    budget[0] -= 1
                    if budget[0] < 0:
                        break
                    if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                        out.append(folder / entry.name)
        except OSError:
            return []  # unreadable: shown as no runs, not an error page
        return sorted(out)

    def walk(folder: Path, depth: int) -> None:
        found.append(folder)
        if depth < MAX_DEPTH and budget[0] > 0 and not (folder / "manifest.json").is_file():
            for child in children(folder):
                walk(child, depth + 1)

    for root in roots.paths:
        if root.is_dir():
            walk(root, 0)
    return found


def find_runs(roots: Roots) -> list[Path]:
    """Every run folder under the roots (sorted by path), at most ``MAX_DEPTH`` levels down."""
    return [folder for folder in folders(roots) if (folder / "manifest.json").is_file()]


def status_of(run: Run, now: float | None = None) -> str:
    status = run.status
    if status == "running":
        files = [run.path / n for n in ("manifest.json", "metrics.jsonl")]
        latest = max((f.stat().st_mtime for f in files if f.exists()), default=0.0)
        if (now or time.time()) - latest > STALE_SECONDS:
            return "interrupted"
    return status


def summary(run: Run, run_id: str) -> dict[str, Any]:
    """One row of the runs table."""
    m = run.record
    s = m.eval_summary or {}
    parent = (m.parent or {}).get("run_dir")
    return {"id": run_id, "name": run.path.name if run.path.name != "run" else f"{run.path.parent.name}/run",
            "status": status_of(run), "recipe": m.recipe if "recipe" in m.model_fields_set else "sft", "method": m.method,
            "model": (m.model or {}).get("spec"), "untuned": s.get("zero_shot_score"), "tuned": s.get("tuned_score"),
            "retention": s.get("probe_retention"), "seconds": m.train_seconds, "steps": m.steps_done,
            "peak_mb": m.peak_memory_mb, "artifact_mb": m.artifact_mb, "created": m.created,
            "parent": parent}


def read_metrics(roots: Roots, run_dir: Path, after: int = 0) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` past its first ``after`` lines (a torn last line is left for the next poll);
    none when the file is missing or links outside the roots."""
    path = run_dir / "metrics.jsonl"
    if not roots.readable(path):
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines()[after:]:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def predictions(run: Run) -> list[dict[str, Any]]:
    """Each eval example: prompt, reference, the untuned answer and the tuned one, each right or not."""
    results = run.eval_results() or {}
    tuned = (results.get("tuned") or {}).get("examples") or []
    before = ((results.get("baselines") or {}).get("zero_shot") or {}).get("examples") or []
    by_source = {e.get("source"): e for e in before}
    rows = []
    for example in tuned:
        untuned = by_source.get(example.get("source")) or {}
        rows.append({"source": example.get("source"), "prompt": example.get("prompt"), "reference": example.get("reference"),
                     "tuned": example.get("prediction"), "tuned_right": (example.get("score") or 0) >= 1,
                     "untuned": untuned.get("prediction"), "untuned_right": (untuned.get("score") or 0) >= 1 if untuned else None})
    return rows


def probe_changes(run: Run) -> dict[str, Any]:
    """The probe items lost and gained, and the counts that say what retention is out of."""
    forgetting = (run.eval_results() or {}).get("forgetting") or {}
    return {"lost": forgetting.get("lost") or [], "gained": forgetting.get("gained") or [],
            **{k: forgetting.get(k) for k in ("items", "right_before", "right_after", "retention")}}


def artifacts(run: Run) -> list[tuple[str, float | None]]:
    """(name, MB) of the run folder's entries, folders summed; a link is listed with no size and not followed."""
    out: list[tuple[str, float | None]] = []
    for entry in sorted(run.path.iterdir()):
        if entry.is_symlink():
            out.append((entry.name + " (link)", None))
        elif entry.is_dir():
            out.append((entry.name + "/", _tree_bytes(entry) / 2**20))
        else:
            out.append((entry.name, entry.stat().st_size / 2**20))
    return out


def _tree_bytes(folder: Path) -> int:
    """The size of the regular files under ``folder``; links (to files or folders) are not followed."""
    total = 0
    for parent, _, names in os.walk(folder):  # followlinks=False: a linked folder is not entered
        for name in names:
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(parent, name))
                total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total


@dataclass(frozen=True)
class ShownRun(Run):
    """A run as the dashboard reads it: its config and evaluation only where those files lie inside the roots."""

    roots: Roots | None = None

    @cached_property
    def record(self) -> Manifest:
        """The typed manifest; one with a field of an odd type (edited by hand, written by another tunelab) is still
        shown, with its values as they are on disk, rather than failing the whole page."""
        try:
            return super().record
        except TunelabError:
            return Manifest.model_construct(**self.manifest) if isinstance(self.manifest, dict) else Manifest()

    @cached_property
    def config(self) -> dict[str, Any]:
        return read_run_config(self.path) if self.roots.readable(self.path / "config.yaml") else {}

    def eval_results(self) -> dict[str, Any] | None:
        return super().eval_results() if self.roots.readable(self.path / "eval.json") else None


def open_in(roots: Roots, path: Path) -> ShownRun | None:
    """The run at ``path`` (a folder inside the roots), or None when it is not one or its manifest links outside."""
    if not path.is_dir() or not roots.readable(path / "manifest.json"):
        return None
    manifest = read_run_manifest(path)
    return ShownRun(path, manifest, roots) if manifest is not None else None


def load(roots: Roots, run_id: str) -> ShownRun | None:
    path = roots.resolve(run_id)
    return open_in(roots, path) if path is not None else None
