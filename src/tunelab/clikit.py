"""What every ``tunelab`` command shares: the stderr console and the decorator that turns user errors (and a full
disk) into a one-line message and exit status 2 (bugs keep their traceback).

Messages are printed as plain text, never as rich markup: a hint like ``pip install 'tunelab[export]'`` or a path
like ``runs/[a]`` must reach the terminal as written.

Commands defined beside the code they drive (``merging/cli.py``, ``serving/cli.py``, ...) import these,
never ``tunelab.cli`` (which imports them).
"""

from __future__ import annotations

import inspect
import os
from functools import wraps

import click
import typer
from rich.console import Console
from rich.text import Text

from tunelab.atomic import describe_disk_full, disk_full
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


def print_error(message: str) -> None:
    """``error: MESSAGE`` on stderr, the message as plain text (no markup), prefixed with the rank in a distributed run."""
    rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
    console.print(Text.assemble(("error:", "bold red"), " ", rank, message), highlight=False, soft_wrap=True)


def friendly(fn):
    """Turn user errors and a full disk into a message and exit status 2; let bugs keep their traceback.

    A full disk (``ENOSPC``/``EDQUOT`` anywhere behind the exception) says which file and, for a command with
    ``--resume``, to resume; the run's manifest was already marked failed by the recipe (``stages.run``).
    """
    resumable = "resume" in inspect.signature(fn).parameters

    @wraps(fn)
    def wrapper(*args, **kwargs):
        quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except TunelabError as err:
            print_error(str(err))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print(Text.assemble(("interrupted", "yellow"), "; resume a training run with --resume"))
            raise typer.Exit(130) from None
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as err:
            full = disk_full(err)
            if full is None:
                raise
            print_error(f"{describe_disk_full(full)}: free space and rerun{' with --resume' if resumable else ''}")
            raise typer.Exit(2) from None

    return wrapper


def metric_options(items: list[str] | None, db, base: dict | None = None) -> dict:
    """``--option KEY=VALUE`` (values read as YAML) and ``--db PATH`` over ``base``: a metric's options."""
    from tunelab import safeyaml

    options = dict(base or {})
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise TunelabError(f"--option {item!r}: expected KEY=VALUE")
        options[key] = safeyaml.load(value, source=f"--option {key}")
    if db is not None:
        options["db"] = str(db)
    return options
