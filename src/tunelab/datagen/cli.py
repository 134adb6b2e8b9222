"""``tunelab data generate`` and ``tunelab data preferences``: training data made by a model."""

from __future__ import annotations

import typer


def register(data_app: typer.Typer) -> None:
    """Add this package's commands (none yet)."""
