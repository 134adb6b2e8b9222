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
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from tunelab.generation import Completion, SamplingSettings, generate, stream
from tunelab.serving.models import Registry, ServedModel


class QueueFull(Exception):
    """The queue holds ``max_pending`` jobs; the request should be retried later."""


@dataclass(eq=False)
class Job:
    """Prompts for one model with one set of sampling settings, and where their result goes.

    Attributes:
        model: The entry to decode with.
        prompts: Conversations or rendered strings (a request's ``n`` choices are ``n`` copies).
        settings: Decoding settings shared by every prompt.
        tokens: Prompt plus maximum completion tokens of all prompts, what the batch bound counts.
        on_delta: For a streamed job, called with each text delta (from the worker thread).
    """

    model: ServedModel
    prompts: list[Any]
    settings: SamplingSettings
    tokens: int
    on_delta: Callable[[str], None] | None = None
    future: Future = field(default_factory=Future)
    cancelled: bool = False
    enqueued: float = field(default_factory=time.monotonic)

    def key(self) -> tuple:
        """Jobs with equal keys may share a batch."""
        alone = self.on_delta is not None or (not self.settings.greedy and self.settings.seed is not None)
        return (self.model.id, self.settings, id(self) if alone else None)


class Scheduler:
    """A bounded job queue and the worker thread that decodes it in batches.

    Args:
        registry: The loaded models; its lock is held while a batch decodes.
        max_pending: Jobs waiting or decoding at most; one more is refused with :class:`QueueFull`.
        max_batch_rows: Prompts per batch at most.
        max_batch_tokens: Prompt plus completion tokens per batch at most (a single larger job still runs alone).
        on_batch: Called as ``on_batch(rows, seconds)`` after each batch (metrics).
    """

    def __init__(self, registry: Registry, *, max_pending: int = 64, max_batch_rows: int = 16,
                 max_batch_tokens: int = 16384, on_batch: Callable[[int, float], None] | None = None):
        self.registry, self.max_pending = registry, max_pending
        self.max_batch_rows, self.max_batch_tokens = max_batch_rows, max_batch_tokens
        self.on_batch = on_batch or (lambda rows, seconds: None)
        self.pending: deque[Job] = deque()
        self.running = 0
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._work, name="tunelab-serve-decode", daemon=True)
        self.thread.start()

    def stop(self, timeout: float | None = 60) -> None:
        """Finish every admitted job, then end the worker."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    @property
    def depth(self) -> int:
        """Jobs waiting or decoding."""
        return len(self.pending) + self.running

    def submit(self, job: Job) -> Future:
        """Queue ``job``; its future gets the list of completions (empty for a streamed job).

        Raises:
            QueueFull: ``max_pending`` jobs are already admitted, or the server is shutting down.
        """
        with self.cond:
            if self.stopping or self.depth >= self.max_pending:
                raise QueueFull(f"{self.depth} requests are queued (the limit is {self.max_pending})")
            self.pending.append(job)
            self.cond.notify()
        return job.future

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest live job and the waiting jobs that can join it; None to stop."""
        with self.cond:
            while True:
                while self.pending and self.pending[0].cancelled:
                    self.pending.popleft().future.cancel()
                if self.pending:
                    break
                if self.stopping:
                    return None
                self.cond.wait()
            first = self.pending.popleft()
            batch, rows, tokens = [first], len(first.prompts), first.tokens
            if first.key()[2] is None:
                for job in list(self.pending):
                    fits = rows + len(job.prompts) <= self.max_batch_rows and tokens + job.tokens <= self.max_batch_tokens
                    if job.key() == first.key() and not job.cancelled and fits:
                        self.pending.remove(job)
                        batch.append(job)
                        rows, tokens = rows + len(job.prompts), tokens + job.tokens
            self.running = len(batch)
            return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            started = time.monotonic()
            try:
                if batch[0].on_delta is not None:
                    self._stream(batch[0])
                else:
                    self._decode(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting requests, the worker goes on
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                with self.cond:
                    self.running = 0
                self.on_batch(sum(len(j.prompts) for j in batch), time.monotonic() - started)

    def _decode(self, batch: list[Job]) -> None:
        prompts = [p for job in batch for p in job.prompts]
        model = batch[0].model
        with self.registry.lock, model.active() as module:
            completions: list[Completion] = generate(module, model.tokenizer, prompts, batch[0].settings,
                                                     batch_size=len(prompts))
        for job in batch:
            job.future.set_result(completions[: len(job.prompts)])
            completions = completions[len(job.prompts):]

    def _stream(self, job: Job) -> None:
        with self.registry.lock, job.model.active() as module:
            deltas = stream(module, job.model.tokenizer, job.prompts[0], job.settings)
            try:
                for delta in deltas:
                    if job.cancelled:  # the client went away: closing the generator stops decoding
                        break
                    job.on_delta(delta)
            finally:
                deltas.close()
        job.future.set_result([])
