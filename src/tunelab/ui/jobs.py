"""The launch queue of ``tunelab ui``: training runs started from the page, one at a time, as subprocesses.

A job is ``python -m tunelab train CONFIG OVERRIDES... output_dir=ROOT/ui-STAMP`` (unless the overrides set
``output_dir``), so the run lands under the dashboard's first folder and shows on its runs page. Before a job
can start, ``python -m tunelab plan`` checks the same config and overrides (the config is validated there, and
the memory verdict shown): a config that does not validate never reaches the queue. Running them as
subprocesses keeps torch out of the dashboard's process and lets a job be cancelled (SIGINT, as Ctrl-C: the
run stops at a step boundary; then SIGTERM after ``GRACE_SECONDS``). A pasted config is written to
``ROOT/.ui-configs/`` (hidden: never listed as a run). The preset ``demo`` runs ``tunelab demo --output-root ROOT``
(the README's first command) with the overrides given, checked with ``tunelab plan`` on the demo's job as a config.
A running job reports its phase and, once training, its optimizer step of the run's total (``manifest.json``'s
``total_steps``, the last ``metrics.jsonl`` row) for the page's progress bar.

What may be launched is confined by :class:`~tunelab.ui.launchrules.LaunchRules` (presets, ``output_dir`` inside the
folders, no code without ``--allow-code``), checked on the config as loaded by the shared loader before ``plan``.
Every subprocess runs ``python -P`` with ``PYTHONSAFEPATH=1`` in the dashboard's working directory: neither that
directory nor any folder a config names is put on the job's import path.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.runs.manifest import read_manifest
from tunelab.ui.launchrules import DEMO, LaunchRules

GRACE_SECONDS = 20
DEMO_CONFIG = "configs/smollm2-135m-instruct/sft_lora_sql.yaml"


@dataclass
class Job:
    id: int
    config: str
    overrides: list[str]
    output_dir: str
    log: Path
    status: str = "queued"  # queued | running | finished | failed | cancelled
    returncode: int | None = None
    started: float | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    def run_dir(self) -> Path | None:
        """The run this job writes: its output_dir, or for the demo the newest demo-* run it created."""
        if self.config != DEMO:
            return Path(self.output_dir) if (Path(self.output_dir) / "manifest.json").is_file() else None
        made = [p for p in Path(self.output_dir).glob("demo-*") if (p / "manifest.json").is_file()
                and p.stat().st_mtime >= (self.started or 0) - 1]
        return max(made, key=lambda p: p.stat().st_mtime) if made else None

    def progress(self) -> dict:
        """Where a running job stands: its phase, and once training the step of the total."""
        if self.status != "running":
            return {"phase": self.status}
        run = self.run_dir()
        if run is None:
            return {"phase": "preparing: data, model, the untuned model's evaluation"}
        try:
            record = read_manifest(run)
        except (OSError, ValueError, TunelabError):  # a manifest being replaced or hand-edited: no total yet
            record = None
        total = record.total_steps if record is not None else None
        step = last_step(run / "metrics.jsonl")
        if total and step >= total:
            return {"phase": "evaluating the tuned model", "step": step, "total": total}
        return {"phase": "training", "step": step, "total": total}

    def view(self) -> dict:
        tail = file_tail(self.log, 3000)  # the page polls this: the last few KB only, however long the log grows
        return {"id": self.id, "config": self.config, "overrides": self.overrides, "output_dir": self.output_dir,
                "status": self.status, "returncode": self.returncode, "log": tail, "progress": self.progress()}


def file_tail(path: Path, size: int) -> str:
    """The last ``size`` bytes of ``path`` as text ("" when there is no file)."""
    if not path.is_file():
        return ""
    with path.open("rb") as f:
        f.seek(max(f.seek(0, 2) - size, 0))
        return f.read().decode("utf-8", errors="replace")


def last_step(metrics: Path) -> int:
    """The step of the newest row of ``metrics.jsonl`` (0 before the first); reads only the file's end."""
    for line in reversed(file_tail(metrics, 4000).splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a partial line being written, or a row without a step
    return 0


def command(*args: str) -> list[str]:
    """``python -P -m tunelab ARGS``: -P keeps the working directory off the import path."""
    return [sys.executable, "-P", "-m", "tunelab", *args]


def job_env() -> dict[str, str]:
    """The dashboard's environment with ``PYTHONSAFEPATH=1`` (as -P, for any Python the job starts in turn)."""
    return {**os.environ, "PYTHONSAFEPATH": "1"}


class JobQueue:
    """Jobs run one at a time, in submission order, under ``rules`` (runs go to the first of ``rules.roots``)."""

    def __init__(self, rules: LaunchRules):
        self.rules = rules
        self.root = rules.roots[0]
        self.jobs: list[Job] = []
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        threading.Thread(target=self._work, daemon=True, name="tunelab-ui-jobs").start()

    def config_file(self, preset: str | None, text: str | None) -> str:
        """The config to run: a preset the rules allow, or pasted YAML written to ``.ui-configs``."""
        if text and text.strip():
            folder = self.root / ".ui-configs"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"config-{time.strftime('%Y%m%d-%H%M%S')}-{next(self.ids)}.yaml"
            path.write_text(text, encoding="utf-8")
            return str(path)
        if not preset:
            raise TunelabError("choose a preset or paste a config")
        return self.rules.preset(preset)

    def with_output(self, overrides: list[str]) -> list[str]:
        if any(o.startswith("output_dir=") for o in overrides):
            return overrides
        return [*overrides, f"output_dir={self.root / ('ui-' + time.strftime('%Y%m%d-%H%M%S'))}"]

    def plan(self, config: str, overrides: list[str]) -> tuple[bool, str]:
        """(whether the config validates and plans, what ``tunelab plan`` printed); a TunelabError, before any
        subprocess, for a config the loader or the rules refuse. A config other than the demo gets an ``output_dir``
        (``with_output``)."""
        if config == DEMO:
            if any(o.startswith("output_dir=") for o in overrides):
                raise TunelabError("the demo names its own run directory (demo-STAMP in the dashboard's first folder): "
                                   "drop the output_dir override")
            self.rules.check(None, ["data.train=demo.jsonl", f"output_dir={self.root / 'demo-STAMP'}", *overrides])
            config = DEMO_CONFIG
        else:
            overrides = self.with_output(overrides)
            self.rules.check(config, overrides)
        done = subprocess.run(command("plan", config, *overrides), capture_output=True, text=True, timeout=300,
                              cwd=self.rules.workdir, env=job_env())
        return done.returncode == 0, (done.stdout + done.stderr).strip()

    def submit(self, config: str, overrides: list[str]) -> Job:
        """Queue a job once the rules and ``tunelab plan`` accept it; the demo gets no ``output_dir`` (it names its
        own run)."""
        overrides = overrides if config == DEMO else self.with_output(overrides)
        ok, text = self.plan(config, overrides)
        if not ok:
            raise TunelabError(text or "tunelab plan refused the config")
        with self.lock:
            number = len(self.jobs) + 1
            logs = self.root / ".ui-configs"
            logs.mkdir(parents=True, exist_ok=True)
            output = str(self.root) if config == DEMO else next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
            job = Job(number, config, overrides, output, logs / f"job-{number}.log")
            self.jobs.append(job)
        self.wake.set()
        return job

    def cancel(self, job_id: int) -> Job:
        job = self.get(job_id)
        with self.lock:
            if job.status == "queued":
                job.status = "cancelled"
            elif job.status == "running" and job.process is not None:
                job.status = "cancelled"
                job.process.send_signal(signal.SIGINT)
                threading.Timer(GRACE_SECONDS, lambda: job.process.poll() is None and job.process.terminate()).start()
        return job

    def get(self, job_id: int) -> Job:
        for job in self.jobs:
            if job.id == job_id:
                return job
        raise KeyError(job_id)

    def _next(self) -> Job | None:
        with self.lock:
            return next((j for j in self.jobs if j.status == "queued"), None)

    def _work(self) -> None:
        while True:
            job = self._next()
            if job is None:
                self.wake.wait(timeout=1.0)
                self.wake.clear()
                continue
            with job.log.open("w", encoding="utf-8") as log, self.lock:
                job.status, job.started = "running", time.time()
                args = ("demo", "--output-root", job.output_dir, *job.overrides) if job.config == DEMO else ("train", job.config, *job.overrides)
                job.process = subprocess.Popen(command(*args), stdout=log, stderr=subprocess.STDOUT,
                                               cwd=self.rules.workdir, env=job_env())
            job.returncode = job.process.wait()
            with self.lock:
                if job.status != "cancelled":
                    job.status = "finished" if job.returncode == 0 else "failed"
