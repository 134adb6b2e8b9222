"""``manifest.json``: what a run was made from (config, data and code hashes, library versions, git commit)."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import tunelab
from tunelab.atomic import write_text_atomic

_LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "tokenizers")


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


def build_manifest(**fields: Any) -> dict[str, Any]:
    return {
        "tunelab_version": tunelab.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": library_versions(),
        "code_hash": code_hash(),
        "git_commit": git_commit(),
        **fields,
    }


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    write_text_atomic(run_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
