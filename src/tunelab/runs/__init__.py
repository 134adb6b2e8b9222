"""Read-only access to a run directory: its resolved config, manifest, artifact and evaluation results.

One place knows the layout (``config.yaml``, ``manifest.json``, the artifact folder named in the
manifest, ``eval_before.json``, ``eval.json``, ``metrics.jsonl``); evaluation, compare and the CLI ask
here instead of parsing the files themselves. Nothing here writes; the manifest's typed record and its
writing live in :mod:`tunelab.runs.manifest`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from tunelab import safeyaml
from tunelab.errors import TunelabError
from tunelab.runs.manifest import FILE, Manifest, parse_manifest, read_manifest_json


def read_run_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The run's manifest as the JSON object on disk, None if there is none; a corrupt one is a user-facing error.
    (:attr:`Run.record` is the typed :class:`~tunelab.runs.manifest.Manifest`.)"""
    return read_manifest_json(run_dir)


def dir_size_mb(path: Path) -> float:
    """The size of the files under ``path`` (an artifact folder), in MB."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The fully resolved config a run recorded (``config.yaml``), {} if there is none."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        return safeyaml.load(safeyaml.read_text(path), str(path)) or {}
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        raise TunelabError(f"{path} is corrupt ({exc}); the run directory was changed by hand") from None


@dataclass(frozen=True)
class Run:
    """A tunelab run directory (it holds ``manifest.json``)."""

    path: Path
    manifest: dict[str, Any]  # as on disk; :attr:`record` is the typed view

    @cached_property
    def record(self) -> Manifest:
        """The manifest as a typed :class:`~tunelab.runs.manifest.Manifest`."""
        return parse_manifest(self.manifest, self.path / FILE)

    @cached_property
    def config(self) -> dict[str, Any]:
        return read_run_config(self.path)

    @property
    def status(self) -> str:
        return str(self.record.status if "status" in self.record.model_fields_set else "unknown")

    @property
    def artifact_dir(self) -> Path:
        return self.path / (self.record.artifact if "artifact" in self.record.model_fields_set else "adapter")

    @property
    def base_model(self) -> str:
        """The resolved base model path the run trained on."""
        return (self.record.model or {})["resolved"]

    @property
    def method_name(self) -> str:
        return self.record.method or self.config.get("method", {}).get("name", "lora")

    def method_options(self) -> dict[str, Any]:
        """The method options the run trained with, without ``name``."""
        section = dict(self.config.get("method") or {})
        section.pop("name", None)
        return section

    def data_settings(self) -> dict[str, Any]:
        """How the run read its examples (format, raw template, system prompt), so other data reads the same way."""
        data = self.config.get("data") or {}
        return {"format": data.get("format", "auto"), "template": data.get("template"), "system_prompt": data.get("system_prompt")}

    def eval_results(self) -> dict[str, Any] | None:
        """``eval.json`` (the tuned model against the baselines), None before the run finished evaluating."""
        path = self.path / "eval.json"
        return json.loads(path.read_text()) if path.is_file() else None


def open_run(path: str | Path) -> Run | None:
    """The run at ``path``, or None when ``path`` is not a run directory."""
    path = Path(path)
    if not path.is_dir():
        return None
    manifest = read_run_manifest(path)
    return Run(path, manifest) if manifest is not None else None
