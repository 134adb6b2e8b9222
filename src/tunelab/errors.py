"""User-facing errors.

A :class:`TunelabError` is a mistake the user can fix (bad config, bad data, missing model). The CLI
prints its message without a traceback and exits with status 2. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class TunelabError(Exception):
    """An error caused by user input; the message says what, where and how to fix it."""


class ConfigError(TunelabError):
    """The configuration is invalid. Holds every problem found, not just the first."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n{lines}")


class DataError(TunelabError):
    """The training or evaluation data is invalid. Holds every bad record found, each as 'file:line: reason'."""

    def __init__(self, problems: list[str], what: str = "data"):
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(
            f"{what}: {len(self.problems)} bad record(s); nothing was trained or written.\n{lines}\n"
            "Fix these records (or remove them) and run again."
        )


class ModelError(TunelabError):
    """A model could not be found, downloaded or converted."""
