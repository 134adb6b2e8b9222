"""Run user code (``module:function`` reward functions; agentic-RL environments later) in a worker process,
each call with a time limit.

The rule, for every piece of user code a training loop calls (a reward function, an environment's ``reset``
or ``step``): it runs in a worker process, never in the training process, and every call has a time limit.
A call ends in one of two ways. Either it returns a value, which the caller then checks against its contract;
or it fails, and the caller raises a :class:`~tunelab.errors.TunelabError` naming the function, so the run is
marked failed, the CLI exits 2 with one line, and nothing is saved as if training had succeeded. Failing is:
raising anything (``SystemExit`` and ``KeyboardInterrupt`` included: :class:`WorkerError`), running past the
limit (the worker is killed: :class:`WorkerStopped`) or ending the worker (``os._exit``, a crash, a signal:
:class:`WorkerStopped`). In the training process the last two cannot be caught: ``os._exit(0)`` would end
training with status 0 and no artifact, and a hang would leave the run "running" forever. Code registered
in the project (the built-in rewards) runs in-process.

The worker is started on the first call (it imports this module and then the user's; not torch), keeps
the user's modules imported between calls (their module-level state lives there, not in the training
process), ignores Ctrl-C (the training process stops it), and is restarted after it was stopped. Its
``sys.path`` is the training process's. Arguments and results cross by pickle.

Hand-written over ``subprocess`` and ``multiprocessing.connection`` because ``multiprocessing.Pool`` and
``concurrent.futures.ProcessPoolExecutor`` cannot kill one hung call (Python 3.11), and their 'spawn' start
re-imports the program's main module (the CLI, with torch) in every worker.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

DEFAULT_TIMEOUT = 120.0  # seconds per call (one call scores a whole round of completions); GRPO's recipe.reward_timeout
DEFAULT_ENV_TIMEOUT = 30.0  # seconds per call of an environment method (reset, step, reward); recipe.environment_timeout
STARTUP_TIMEOUT = 120.0  # seconds a worker process may take to start, before its first call's own limit begins
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder that holds tunelab/
_BOOT = "import sys; sys.path.insert(0, sys.argv[3]); from tunelab.rewards.guard import serve; serve(int(sys.argv[1]), int(sys.argv[2]))"


class WorkerError(Exception):
    """The function raised in the worker.

    Attributes:
        kind: The name of the exception's type (``ValueError``, ``SystemExit``).
        details: The worker's traceback, for a bug report.
    """

    def __init__(self, kind: str, message: str, details: str = ""):
        super().__init__(message)
        self.kind, self.details = kind, details


class WorkerStopped(TunelabError):
    """The call ran past its time limit (the worker was killed) or ended the worker; the message completes
    "function NAME ...", e.g. ``did not return within 60 s``."""

    def __init__(self, message: str, *, timed_out: bool):
        super().__init__(message)
        self.timed_out = timed_out


class Worker:
    """One worker process for calls of ``module:function`` targets; see the module docstring."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._calls: Connection | None = None
        self._results: Connection | None = None

    def _start(self) -> None:
        call_read, call_write = os.pipe()
        result_read, result_write = os.pipe()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(call_read), str(result_write), _PACKAGE_ROOT],
            pass_fds=(call_read, result_write), stdin=subprocess.DEVNULL, close_fds=True,
        )
        os.close(call_read)
        os.close(result_write)
        self._calls, self._results = Connection(call_write, readable=False), Connection(result_read, writable=False)
        with contextlib.suppress(BrokenPipeError, ConnectionError):  # a worker that died at start: the call says so
            self._calls.send(("path", [p or os.getcwd() for p in sys.path]))
        # The interpreter's start is not the call's time: a loaded machine can take seconds to boot one, which
        # would count against a short per-call limit (an environment's) on its first call.
        with contextlib.suppress(EOFError, ConnectionError):
            if self._results.poll(STARTUP_TIMEOUT):
                self._results.recv()  # ("ready",); a worker that died at start: the call says so

    def call(self, target: str, args: tuple, kwargs: dict, timeout: float) -> Any:
        """``target(*args, **kwargs)`` in the worker (``target`` is ``'module:function'``); what it returned.

        Raises:
            WorkerError: The function raised (anything, ``SystemExit`` included).
            WorkerStopped: It did not return within ``timeout`` seconds, or ended the worker.
            TunelabError: It raised a TunelabError (message kept), or the arguments cannot be pickled.
        """
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            self._start()
        try:
            self._calls.send(("call", target, args, kwargs))
        except (BrokenPipeError, ConnectionError, EOFError):
            raise self._ended() from None
        except Exception as e:  # noqa: BLE001 - pickling fails with several types
            raise TunelabError(f"its arguments cannot be sent to its worker process ({type(e).__name__}: {e}); "
                               "keep data fields and options to plain values (text, numbers, lists, dicts)") from None
        if not self._results.poll(timeout):
            self.close(kill=True)
            raise WorkerStopped(f"did not return within {timeout:g} s, so it was stopped", timed_out=True)
        try:
            status, *payload = self._results.recv()
        except (EOFError, ConnectionError):
            raise self._ended() from None
        if status == "ok":
            return payload[0]
        kind, message, details, is_tunelab = payload
        raise TunelabError(message) if is_tunelab else WorkerError(kind, message, details)

    def _ended(self) -> WorkerStopped:
        code = self._proc.wait() if self._proc is not None else None
        self.close()
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        return WorkerStopped(f"ended its process ({how}) instead of returning: it called os._exit() or crashed",
                             timed_out=False)

    def close(self, kill: bool = False) -> None:
        """Stop the worker: it exits when its call pipe closes, and is killed if it has not within a second
        (or at once with ``kill``, for a hung call)."""
        for conn in (self._calls, self._results):
            if conn is not None:
                conn.close()
        self._calls = self._results = None
        if self._proc is not None:
            if kill:
                self._proc.kill()
            try:
                self._proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


# ------------------------------------------------------------------------------------- the worker's side

def _function(target: str, cache: dict[str, Any]) -> Any:
    if target not in cache:
        module_name, _, name = target.partition(":")
        cache[target] = getattr(importlib.import_module(module_name), name)
    return cache[target]


def _run(message: tuple, cache: dict[str, Any]) -> tuple:
    _, target, args, kwargs = message
    try:
        out = _function(target, cache)(*args, **kwargs)
        if hasattr(out, "tolist") and getattr(out, "ndim", None) == 1:  # a numpy array or tensor: no torch needed
            out = out.tolist()
        return ("ok", out)
    except SystemExit as e:
        return ("error", "SystemExit", f"sys.exit({e.code!r}) was called", traceback.format_exc(), False)
    except BaseException as e:  # noqa: BLE001 - whatever it raises goes back to the caller, which names it
        return ("error", type(e).__name__, str(e), traceback.format_exc(), isinstance(e, TunelabError))


def serve(calls_fd: int, results_fd: int) -> None:
    """The worker's loop: take ``("path", sys.path)`` and ``("call", target, args, kwargs)`` messages until the
    call pipe closes; answer each call with ``("ok", value)`` or ``("error", kind, message, traceback, tunelab)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the trainer handles it
    calls, results = Connection(calls_fd, writable=False), Connection(results_fd, readable=False)
    cache: dict[str, Any] = {}
    while True:
        try:
            message = calls.recv()
        except EOFError:
            return
        if message[0] == "path":
            sys.path[:] = message[1]
            results.send(("ready",))
            continue
        reply = _run(message, cache)
        try:
            results.send(reply)
        except Exception as e:  # noqa: BLE001 - an unpicklable return value
            results.send(("error", type(e).__name__, f"returned a value that cannot be sent back ({e}); return a "
                          "list of floats", "", False))
