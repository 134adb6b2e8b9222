"""Read-only access to a run directory: its resolved config, manifest, artifact and evaluation results.

One place knows the layout (``config.yaml``, ``manifest.json``, the artifact folder named in the
manifest, ``eval_before.json``, ``eval.json``, ``metrics.jsonl``); evaluation, compare and the CLI ask
here instead of parsing the files themselves. Nothing here writes.
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


def read_run_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The run's manifest, None if there is none; a corrupt one is a user-facing error."""
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TunelabError(f"{path} is corrupt ({exc}); start a new run in another output_dir") from None


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
    manifest: dict[str, Any]

    @cached_property
    def config(self) -> dict[str, Any]:
        return read_run_config(self.path)

    @property
    def status(self) -> str:
        return str(self.manifest.get("status", "unknown"))

    @property
    def artifact_dir(self) -> Path:
        return self.path / self.manifest.get("artifact", "adapter")

    @property
    def base_model(self) -> str:
        """The resolved base model path the run trained on."""
        return self.manifest["model"]["resolved"]

    @property
    def method_name(self) -> str:
        return self.manifest.get("method") or self.config.get("method", {}).get("name", "lora")

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
