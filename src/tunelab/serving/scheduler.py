"""The one decoding thread of the server and the bounded queue in front of it.

Requests become :class:`Job` values in a queue of bounded length (a full queue is refused at once, so a
client gets 429 instead of waiting without end). One worker thread takes the oldest job and, with it, every
waiting job for the same model and the same sampling settings, up to a bound on rows and on tokens, and
decodes them as one ``tunelab.generation.generate`` batch: concurrent requests for one adapter share a
forward pass, requests for different adapters take turns batch by batch (the batch's adapter is made active
first). Greedy answers do not depend on the batch they are decoded in, so they equal ``tunelab eval``'s.
This is dynamic batching between whole ``generate`` calls (``tunelab serve --batching dynamic``): a request
arriving while a batch decodes waits for that batch to finish. The default, ``serving.continuous``, keeps
this queue and these limits and admits requests into the running batch between decode steps.

A sampled request with a seed is decoded alone, so its answer depends on its seed only. A streamed request
is decoded alone through ``tunelab.generation.stream``; if its reader goes away it stops at the next token.

The bounds hold for a single job too: a job of more rows or tokens than one batch takes (a request of 400
prompts with ``n`` 16) is decoded a slice of rows at a time, and its answer is put together, in order, once
every row has one. ``stop(timeout)`` drains until its deadline, then fails what is still waiting or decoding.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable

from tunelab.errors import TunelabError
from tunelab.generation import Completion, SamplingSettings, generate, stream
from tunelab.generation.constrain import Grammar
from tunelab.serving.models import Registry, ServedModel


class QueueFull(Exception):
    """The queue holds ``max_pending`` jobs; the request should be retried later."""


class ModelGone(TunelabError):
    """The request's model was unloaded after the request named it (answered 404, as an unknown model is)."""


class ShutDown(TunelabError):
    """The server stopped (its drain deadline passed) before this request was answered."""


def settle(future: Future, result: Any = None, error: BaseException | None = None) -> bool:
    """Give ``future`` its result (or ``error``); False when it was already done (cancelled, or failed by
    :meth:`Scheduler.stop` at its deadline while the worker still decoded it)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
        return True
    except InvalidStateError:
        return False


@dataclass(eq=False)
class Job:
    """Prompts for one model with one set of sampling settings, and where their result goes.

    Attributes:
        model: The entry to decode with.
        prompts: Conversations or rendered strings (a request's ``n`` choices are ``n`` copies).
        settings: Decoding settings shared by every prompt.
        tokens: Prompt plus maximum completion tokens of all prompts, what the batch bound counts.
        on_delta: For a streamed job, called with each text delta (from the worker thread).
        constraint: A grammar every row's completion follows (structured outputs, forced tool calls), or None;
            jobs with different grammars share a batch, each row masked by its own.
    """

    model: ServedModel
    prompts: list[Any]
    settings: SamplingSettings
    tokens: int
    on_delta: Callable[[str], None] | None = None
    constraint: Grammar | None = None
    future: Future = field(default_factory=Future)
    cancelled: bool = False
    enqueued: float = field(default_factory=time.monotonic)
    taken: int = 0  # rows handed to a batch so far (a job larger than one batch is taken a slice at a time)
    results: dict[int, Completion] = field(default_factory=dict)  # row index -> its completion

    def key(self) -> tuple:
        """Jobs with equal keys may share a batch."""
        alone = self.on_delta is not None or (not self.settings.greedy and self.settings.seed is not None)
        return (self.model.id, self.settings, id(self) if alone else None)

    @property
    def row_tokens(self) -> int:
        """Tokens one row counts against ``max_batch_tokens``: the job's count spread over its rows."""
        return max(1, -(-self.tokens // max(1, len(self.prompts))))

    def rows_that_fit(self, rows: int, tokens: int, max_rows: int, max_tokens: int) -> int:
        """How many of the rows not taken yet fit beside ``rows`` rows of ``tokens`` tokens; at least one
        in an empty batch (a row larger than ``max_tokens`` still runs, alone)."""
        fit = min(len(self.prompts) - self.taken, max_rows - rows, (max_tokens - tokens) // self.row_tokens)
        return max(fit, 0 if rows else 1)

    def record(self, first: int, completions: list[Completion]) -> None:
        """Keep the completions of rows ``first``, ``first + 1``...; once every row has one the future gets
        them all, in row order (prompt-major, as OpenAI numbers a request's choices)."""
        for i, completion in enumerate(completions):
            self.results[first + i] = completion
        if len(self.results) == len(self.prompts):
            settle(self.future, [self.results[i] for i in range(len(self.prompts))])


Slice = tuple[Job, int, int]  # a job and the rows [start, stop) of it that a batch decodes


class Scheduler:
    """A bounded job queue and the worker thread that decodes it in batches.

    Args:
        registry: The loaded models; its lock is held while a batch decodes.
        max_pending: Jobs waiting or decoding at most; one more is refused with :class:`QueueFull`.
        max_batch_rows: Prompts per batch at most (a larger job is decoded in several batches).
        max_batch_tokens: Prompt plus completion tokens per batch at most (a larger job is split likewise;
            a single row larger than this still runs, alone).
        on_batch: Called as ``on_batch(rows, seconds)`` after each batch (metrics).
    """

    def __init__(self, registry: Registry, *, max_pending: int = 64, max_batch_rows: int = 16,
                 max_batch_tokens: int = 16384, on_batch: Callable[[int, float], None] | None = None):
        self.registry, self.max_pending = registry, max_pending
        self.max_batch_rows, self.max_batch_tokens = max_batch_rows, max_batch_tokens
        self.on_batch = on_batch or (lambda rows, seconds: None)
        self.pending: deque[Job] = deque()
        self.live: set[Job] = set()  # submitted and not answered yet (waiting, or some rows decoding)
        self.cond = threading.Condition()
        self.stopping = False
        self.aborted = False  # the drain deadline passed: the worker drops what it holds and ends
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._work, name="tunelab-serve-decode", daemon=True)
        self.thread.start()

    def stop(self, timeout: float | None = 60) -> None:
        """Refuse new jobs, finish the admitted ones until ``timeout`` seconds have passed (None: no deadline),
        then fail those still waiting or decoding with :class:`ShutDown` and end the worker."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)
        if self.thread is None or self.thread.is_alive():
            self._abort()
            if self.thread is not None:
                self.thread.join(1.0)  # the worker notices at its next token; it is a daemon either way

    def _abort(self) -> None:
        """Fail every job not answered yet (first, so no half-decoded answer is handed out), then tell the worker."""
        with self.cond:
            for job in list(self.live):
                settle(job.future, error=ShutDown("the server shut down before this request was answered "
                                                  "(its drain deadline passed); send it again once it is back"))
                job.cancelled = True
            self.pending.clear()
            self.aborted = True
            self.cond.notify_all()

    @property
    def depth(self) -> int:
        """Jobs waiting or decoding."""
        return len(self.live)

    def submit(self, job: Job) -> Future:
        """Queue ``job``; its future gets the list of completions (empty for a streamed job).

        A job for a model that was unloaded since it was looked up fails at once (its future raises a
        :class:`ModelGone`); a queued job keeps its model loaded until it is answered (``Registry.unload``
        waits for it).

        Raises:
            QueueFull: ``max_pending`` jobs are already admitted, or the server is shutting down.
        """
        with self.cond:
            if self.stopping or self.depth >= self.max_pending:
                raise QueueFull(f"{self.depth} requests are queued (the limit is {self.max_pending})")
            if not self.registry.retain(job.model):
                settle(job.future, error=ModelGone(f"model {job.model.id!r} was unloaded before this request "
                                                      "started; load it again (POST /v1/load_lora_adapter) or use another"))
                return job.future
            self.live.add(job)
            job.future.add_done_callback(lambda _: (self.live.discard(job), self.registry.release(job.model)))
            self.pending.append(job)
            self.cond.notify()
        return job.future

    def _drop_dead(self) -> None:
        """Take cancelled jobs (the client went away) and failed ones (a slice of them failed) off the queue."""
        for job in [j for j in self.pending if j.cancelled or j.future.done()]:
            self.pending.remove(job)
            job.future.cancel()

    def _take(self) -> list[Slice] | None:
        """The next batch: rows of the oldest live job and of the waiting jobs that can join it; None to stop."""
        with self.cond:
            while True:
                self._drop_dead()
                if self.pending and not self.aborted:
                    break
                if self.stopping or self.aborted:
                    return None
                self.cond.wait()
            first = self.pending[0]
            batch: list[Slice] = []
            rows = tokens = 0
            for job in list(self.pending) if first.key()[2] is None else [first]:
                if job.key() != first.key():
                    continue
                take = job.rows_that_fit(rows, tokens, self.max_batch_rows, self.max_batch_tokens)
                if take:
                    batch.append((job, job.taken, job.taken + take))
                    job.taken += take
                    rows, tokens = rows + take, tokens + take * job.row_tokens
                    if job.taken == len(job.prompts):
                        self.pending.remove(job)
            return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            started = time.monotonic()
            try:
                if batch[0][0].on_delta is not None:
                    self._stream(batch[0][0])
                else:
                    self._decode(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting requests, the worker goes on
                for job, _, _ in batch:
                    settle(job.future, error=exc)
            finally:
                self.on_batch(sum(stop - start for _, start, stop in batch), time.monotonic() - started)

    def _decode(self, batch: list[Slice]) -> None:
        prompts = [p for job, start, stop in batch for p in job.prompts[start:stop]]
        model, settings = batch[0][0].model, batch[0][0].settings
        if settings.seed is not None and batch[0][1]:  # a later slice of a seeded job: its own draws, still seeded
            settings = dataclasses.replace(settings, seed=settings.seed + batch[0][1])
        with self.registry.lock, model.active() as module:
            constraints = [job.constraint for job, start, stop in batch for _ in range(start, stop)]
            completions: list[Completion] = generate(module, model.tokenizer, prompts, settings, batch_size=len(prompts),
                                                     should_stop=lambda: self.aborted, constraints=constraints)
        for job, start, stop in batch:
            job.record(start, completions[: stop - start])
            completions = completions[stop - start:]

    def _stream(self, job: Job) -> None:
        with self.registry.lock, job.model.active() as module:
            deltas = stream(module, job.model.tokenizer, job.prompts[0], job.settings, constraint=job.constraint)
            try:
                for delta in deltas:
                    if job.cancelled:  # the client went away: closing the generator stops decoding
                        break
                    job.on_delta(delta)
            finally:
                deltas.close()
        settle(job.future, [])
