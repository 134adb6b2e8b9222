"""``manifest.json``: what a run was made from and how it stands, as one typed record written and read here.

A run's manifest says what made it (config, data and code hashes, library versions, git commit), where it
computed (precision, device, processes), what it trains (model, method, recipe, parameters, steps, artifact),
how it stands (``status``: ``running``, ``finished``, ``failed`` or ``interrupted`` with the ``failure``
reason) and, once finished, what it cost and reached (seconds, tokens/s, peak memory, the final losses, the
evaluation summary). A resume keeps the original provenance and appends each invocation to ``resumed``.

On disk it is plain JSON: only the fields a run set are written (a field set to None is written as null), in
the order declared below, so the file is the one earlier tunelab versions wrote and any tool reading it as JSON
sees the same keys and values. tunelab's own readers take it through :class:`Manifest` (``Run.record``,
:func:`read_manifest`). Fields this tunelab does not know (a newer or older manifest) are kept as they are.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

import tunelab
from tunelab.atomic import write_text_atomic
from tunelab.errors import TunelabError

FILE = "manifest.json"
_LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "tokenizers")
_PROVENANCE = ("created", "code_hash", "git_commit", "versions")  # kept from the first invocation on a resume


class Manifest(BaseModel):
    """The record of one run directory; every field is optional, as a run sets them as it goes."""

    model_config = ConfigDict(extra="allow")

    # provenance: what made the run
    tunelab_version: str | None = None
    created: str | None = None
    versions: dict[str, str | None] | None = None
    code_hash: str | None = None
    git_commit: str | None = None
    status: str | None = None  # running | finished | failed | interrupted
    config_hash: str | None = None
    data_hash: str | None = None
    data_files: list[str] | None = None
    precision_setting: str | None = None  # train.precision as configured (``precision`` is what it resolved to)
    recipe: str | None = None
    processes: int | None = None
    distributed_strategy: str | None = None
    # what trains, and where
    model: dict[str, Any] | None = None  # {"spec": as configured, "resolved": the local path}
    method: str | None = None
    precision: str | None = None
    device: str | None = None
    device_kind: str | None = None
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    total_steps: int | None = None
    artifact: str | None = None  # the artifact folder's name in the run directory
    checkpointed_blocks: int | None = None
    defaults_chosen: dict[str, Any] | None = None
    parent: dict[str, Any] | None = None  # init_from: the parent run's record
    resumed: list[dict[str, Any]] | None = None  # one entry per resumed invocation
    mlflow_run_id: str | None = None
    # the end: costs, results, or what stopped it
    finished: str | None = None
    train_seconds: float | None = None
    tokens_per_s: float | None = None
    steps_done: int | None = None
    peak_memory_mb: float | None = None
    peak_memory_kind: str | None = None
    validations: int | None = None
    best_step: int | None = None
    best_eval_loss: float | None = None
    stopped_by: str | None = None  # max_seconds | early_stopping
    artifact_mb: float | None = None
    final_train_loss: float | None = None
    final_eval: dict[str, Any] | None = None
    eval_summary: dict[str, Any] | None = None
    failure: str | None = None
    ended: str | None = None

    def set(self, **fields: Any) -> Manifest:
        """Set ``fields`` (declared or not: a recipe's own cost keys are kept as they are); returns self."""
        for key, value in fields.items():
            setattr(self, key, value)
        return self

    def to_json(self) -> dict[str, Any]:
        """The fields this run set, as ``manifest.json`` holds them."""
        return self.model_dump(exclude_unset=True)


def now() -> str:
    """The manifest's timestamps: local time with its UTC offset."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "tunelab": tunelab.__version__}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def code_hash() -> str:
    """sha256 over tunelab's own source files, so an artifact can be traced to the code that made it."""
    root = Path(tunelab.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def git_commit() -> str | None:
    """The commit of the tunelab checkout, with '-dirty' if it has local changes; None outside git."""
    root = Path(tunelab.__file__).parent
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=5)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() / "src" / "tunelab" != root.resolve():
            return None  # not tunelab's own checkout (e.g. installed inside another repository)
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=5)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def new_manifest(previous: Manifest | None, resumed_from_step: int | None, **fields: Any) -> Manifest:
    """A ``running`` manifest for this invocation; on resume the original creation time and provenance are kept
    and this invocation's code hash, commit and versions are appended to ``resumed``."""
    current = Manifest(tunelab_version=tunelab.__version__, created=now(), versions=library_versions(), code_hash=code_hash(),
                       git_commit=git_commit(), status="running", **fields)
    if previous is None:
        return current
    entry = {"at": current.created, "from_step": resumed_from_step, "after": previous.status, "code_hash": current.code_hash,
             "git_commit": current.git_commit, "versions": current.versions,
             **{k: getattr(current, k) for k in ("precision", "device") if k in current.model_fields_set}}
    kept = {k: getattr(previous, k) for k in _PROVENANCE if k in previous.model_fields_set}
    return current.set(**kept, resumed=[*(previous.resumed or []), entry])


def read_manifest_json(run_dir: Path) -> dict[str, Any] | None:
    """``manifest.json`` as it is on disk, None if there is none; a corrupt one is a user-facing error."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TunelabError(f"{path} is corrupt ({exc}); start a new run in another output_dir") from None


def parse_manifest(data: dict[str, Any], where: Path | str) -> Manifest:
    """``data`` (a manifest read from ``where``) as a :class:`Manifest`; a field of the wrong type is a user-facing error."""
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise TunelabError(f"{where} is corrupt ({problems}); start a new run in another output_dir") from None


def read_manifest(run_dir: Path) -> Manifest | None:
    """The run's manifest, None if there is none; a corrupt one is a user-facing error."""
    data = read_manifest_json(run_dir)
    return None if data is None else parse_manifest(data, Path(run_dir) / FILE)


def write_manifest(run_dir: Path, manifest: Manifest) -> None:
    """Write the manifest atomically (a kill leaves the previous one whole)."""
    write_text_atomic(Path(run_dir) / FILE, json.dumps(manifest.to_json(), indent=2) + "\n")
