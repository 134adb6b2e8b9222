"""Export: a run (merged) or model as HF safetensors, GGUF (f16/bf16/q8_0 and llama.cpp's K-quants, with an Ollama
Modelfile) or a GGUF LoRA adapter, written by llama.cpp's own converter and quantizer and each checked against
the HF model in llama.cpp before it is published (``export_model``).

The formats are a registry (``EXPORTERS``, ``export.formats``): each exporter module registers its own. Names
are loaded on first use, so ``tunelab --help`` (which imports ``tunelab.export.cli``) does not import
torch, numpy or gguf.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {"export_model": "pipeline", "EXPORTERS": "formats", "write_gguf": "converter", "QUANTS": "converter"}

__all__ = sorted([*_WHERE, "FORMATS"])


def __getattr__(name: str) -> Any:
    if name == "FORMATS":  # the registered export formats, sorted (``EXPORTERS`` has their summaries)
        return tuple(import_module("tunelab.export.formats").EXPORTERS.names())
    if name not in _WHERE:
        raise AttributeError(f"module 'tunelab.export' has no attribute {name!r}")
    return getattr(import_module(f"tunelab.export.{_WHERE[name]}"), name)
