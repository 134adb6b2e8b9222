"""The export formats of ``tunelab export --format``: a registry of exporters, one per format.

An exporter writes a source into the temporary output folder and returns its part of the report::

    exporter(source, tmp, quant, force, prompts, new_tokens) -> dict

``pipeline`` registers ``hf`` and ``gguf``, ``gguf_lora`` registers ``gguf-lora``; ``pipeline.export_model``
checks the arguments, opens the source, publishes the folder atomically and calls the format's exporter.
A leaf of ``tunelab.export``: the registry imports the exporter modules by name on its first lookup, so
neither imports the other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.registry import Registry

Exporter = Callable[[Any, Path, str, bool, int, int | None], dict[str, Any]]

EXPORTERS: Registry[Exporter] = Registry("export format", modules=("tunelab.export.pipeline", "tunelab.export.gguf_lora"))


def register_exporter(name: str, *, summary: str) -> Callable[[Exporter], Exporter]:
    """Decorator: register the exporter of the format ``name`` with a one-line ``summary`` for help texts."""
    return EXPORTERS.decorator(name, summary=summary)
