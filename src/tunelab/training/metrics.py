"""Metrics to ``metrics.jsonl`` (one JSON object a line) and, when installed and in ``tracking``, TensorBoard
(MLflow mirrors the file when the run ends: ``training.tracking``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.atomic import write_text_atomic


class MetricsLog:
    """Append-only metrics log of a run directory.

    On resume, records past the resumed step are dropped first, so the log reads as one clean run.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) is not None and _step_of(line) <= resume_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if "tensorboard" not in _trackers(run_dir):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step)
        except ImportError:  # tensorboard is optional
            pass

    def log(self, record: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as err:  # a full disk: name the file, as the command's one-line error shows it
            raise OSError(err.errno, err.strerror, str(self.path)) from err
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _trackers(run_dir: Path) -> list[str]:
    """The run's ``tracking`` setting, read from its config.yaml (tensorboard when there is none)."""
    from tunelab.runs import read_run_config

    return list(read_run_config(run_dir).get("tracking") or ["tensorboard"])


def _step_of(line: str) -> int | None:
    """The step of a log line; None for a blank or half-written line (a kill mid-write)."""
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None
