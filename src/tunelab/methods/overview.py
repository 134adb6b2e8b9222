"""What each tuning method costs on a given model: trainable parameters and artifact size on disk.

Measured, not estimated: every method is applied with its default options to a freshly loaded copy
of the model, its trainable parameters are counted and its artifact is saved to a temporary folder.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.methods.base import count_parameters, get_method, method_names
from tunelab.models.load import load_model, resolve_model_path
from tunelab.runs import dir_size_mb


def method_costs(model: str, names: list[str] | None = None, on_method: Callable[[str], None] | None = None) -> list[dict]:
    """One row per method: name, trainable and total parameters, artifact folder and MB, mergeable, notes."""
    path = resolve_model_path(model)
    rows = []
    for name in names or method_names():
        method = get_method(name)
        if on_method:
            on_method(name)
        options = method.options_class()
        row = {"method": name, "artifact": method.artifact, "mergeable": method.mergeable,
               "incompatible": sorted(method.incompatible)}
        try:
            tuned = method.apply(load_model(path, "float32", **method.base_load_kwargs(options)), options)
        except TunelabError as exc:  # e.g. bitsandbytes missing for qlora
            rows.append({**row, "error": str(exc)})
            continue
        row["trainable_parameters"], row["total_parameters"] = count_parameters(tuned)
        with tempfile.TemporaryDirectory(prefix="tunelab-methods-") as tmp:
            method.save(tuned, Path(tmp) / method.artifact)
            row["artifact_mb"] = round(dir_size_mb(Path(tmp)), 3)
        rows.append(row)
        del tuned
    return rows
