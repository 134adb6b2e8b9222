"""What every ``tunelab`` command shares: the stderr console and the decorator that turns user errors into a
message and exit status 2 (bugs keep their traceback).

Commands defined beside the code they drive (``merging/cli.py``, ``serving/cli.py``, ...) import these,
never ``tunelab.cli`` (which imports them).
"""

from __future__ import annotations

import os
from functools import wraps

import typer
from rich.console import Console

from tunelab.errors import TunelabError

console = Console(stderr=True)


def quiet_libraries() -> None:
    """Our progress bar and messages replace the libraries' per-file loading bars and deprecation chatter."""
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def friendly(fn):
    """Turn user errors into a message and exit status 2; let bugs keep their traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except TunelabError as err:
            rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
            console.print(f"[bold red]error:[/] {rank}{err}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]; resume a training run with --resume")
            raise typer.Exit(130) from None

    return wrapper


def metric_options(items: list[str] | None, db, base: dict | None = None) -> dict:
    """``--option KEY=VALUE`` (values read as YAML) and ``--db PATH`` over ``base``: a metric's options."""
    import yaml

    options = dict(base or {})
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise TunelabError(f"--option {item!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
    if db is not None:
        options["db"] = str(db)
    return options
