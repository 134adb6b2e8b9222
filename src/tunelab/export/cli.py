"""``tunelab export``: write a run or model as HF or GGUF, verified with the runtime that will run it."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this package's commands (none yet)."""
