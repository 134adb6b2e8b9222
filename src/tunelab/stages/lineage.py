"""``init_from``: start a run from a previous run's result, and record where it came from (lineage).

Two ways to start from a parent run:

* **continue** (default): the parent's artifact is loaded onto the base and keeps training — the same
  method with the same options (sequential fine-tuning, SFT → DPO on one adapter);
* **merge** (``init_from_merge: true``): the parent's update is folded into the base weights and a fresh
  method trains on top, so the parent becomes the new base (and, for preference tuning, the reference).

Everything is checked before a model loads: the parent is a finished run with its artifact, on the same
base model, with a method that can continue or merge as asked. The child's manifest records the parent's
config, data and artifact hashes, and the parent's artifact is one of the child's hashed inputs, so a
resume refuses a parent that changed underneath it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config.schema import RunConfig
from tunelab.data import data_fingerprint
from tunelab.errors import TunelabError
from tunelab.methods import TuningMethod, get_method
from tunelab.models.load import resolve_model_path
from tunelab.runs import Run, open_run


@dataclass(frozen=True)
class Parent:
    """A checked ``init_from`` run."""

    run: Run
    method: TuningMethod
    merge: bool  # fold into the base (init_from_merge) rather than continue the artifact

    @property
    def artifact_dir(self) -> Path:
        return self.run.artifact_dir

    @property
    def continues(self) -> bool:
        """The child trains the parent's own artifact on."""
        return not self.merge

    def record(self) -> dict[str, Any]:
        """The manifest's ``parent`` entry."""
        m = self.run.record
        return {"run_dir": str(self.run.path.resolve()), "recipe": m.recipe if "recipe" in m.model_fields_set else "sft",
                "method": self.method.name, "mode": "merge" if self.merge else "continue", "config_hash": m.config_hash,
                "data_hash": m.data_hash, "artifact_hash": data_fingerprint([str(self.artifact_dir)]),
                "eval_summary": m.eval_summary}


def read_parent(config: RunConfig) -> Parent | None:
    """The checked parent run of ``config.init_from`` (None without one); a TunelabError says what does not fit."""
    if config.init_from is None:
        if config.init_from_merge:
            raise TunelabError("init_from_merge: true needs init_from: RUN_DIR (the run whose result is merged into the base)")
        return None
    where = f"init_from={config.init_from}"
    run = open_run(config.init_from)
    if run is None:
        raise TunelabError(f"{where}: not a tunelab run directory (no manifest.json); give the output_dir of a finished run")
    if run.status != "finished" or not run.artifact_dir.is_dir():
        raise TunelabError(f"{where}: the run is {run.status} and has no {run.artifact_dir.name}/ yet; finish it with "
                           "`tunelab train ... --resume` first")
    if Path(run.base_model).resolve() != Path(resolve_model_path(config.model.path)).resolve():
        raise TunelabError(f"{where}: that run trained {(run.record.model or {}).get('spec')} ({run.base_model}), this config "
                           f"trains model.path={config.model.path}; set model.path to the parent's base model")
    method = get_method(run.method_name)
    if config.init_from_merge:
        if not method.mergeable:
            raise TunelabError(f"{where}: method {method.name} cannot be merged into the base; drop init_from_merge to keep "
                               "training its artifact instead")
    else:
        _check_same_method(config, run, where)
    return Parent(run, method, config.init_from_merge)


def _check_same_method(config: RunConfig, run: Run, where: str) -> None:
    """Continuing an artifact trains the parent's method as it was configured; a different one is refused."""
    if config.method.name != run.method_name:
        raise TunelabError(f"{where}: the parent trained method {run.method_name}, this config method.name={config.method.name}; "
                           f"set method.name={run.method_name} to continue its artifact, or init_from_merge: true to "
                           f"merge it and train {config.method.name} on top")
    ours = config.method.model_dump()
    theirs = get_method(run.method_name).options_class(**run.method_options()).model_dump()
    differ = sorted(k for k in ours if ours[k] != theirs.get(k) and k != "trainable_token_indices")
    if differ:
        listed = ", ".join(f"method.{k}: parent {theirs.get(k)!r}, here {ours[k]!r}" for k in differ)
        raise TunelabError(f"{where}: continuing the parent's artifact keeps its options, but {listed}; copy the parent's "
                           "method section, or set init_from_merge: true to train a fresh method on the merged parent")


def start_from_parent(parent: Parent | None, base):
    """The model training starts from: ``base`` itself, the parent's artifact on it (trainable), or the parent merged in."""
    if parent is None:
        return base
    model = parent.method.load(base, parent.artifact_dir, trainable=parent.continues)
    return parent.method.merge(model) if parent.merge else model


def parent_inputs(parent: Parent | None) -> list[str]:
    """Files whose change must refuse a resume: the parent's artifact folder."""
    return [str(parent.artifact_dir)] if parent else []
