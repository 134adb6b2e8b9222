"""``tunelab serve`` and ``tunelab chat``."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this package's commands (none yet)."""
