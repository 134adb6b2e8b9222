"""Continuous batching: requests join and leave the running batch between decode steps.

The worker keeps one running batch and a KV cache for it. Between two decode steps it admits the waiting
jobs at the front of the queue that fit (rows and tokens bounded as in ``scheduler``): their prompts are
prefilled in one forward pass and their cache rows joined to the batch's; a row that ends (a stop token, a
stop string, ``max_tokens``, or a client gone) leaves at once, so a short request never waits for a long one
and a new one never waits for the batch to drain. A batch holds the rows of one model or adapter; a request
for another waits (in order) until it drains. With ``mix_adapters`` requests for different LoRA adapters of one
base decode in the same forward pass, each row through its own adapter (peft's ``adapter_names``,
``"__base__"`` for the base); other adapter kinds and models with their own weights always batch per model.

The cache is left-padded: every row's newest token is in the last column, a row's positions count its real
tokens only (as ``model.generate`` computes them under left padding), so a greedy answer equals the one
``generate`` gives alone (tested). Each job samples from its own seeded generator, so a seeded answer does
not depend on who else is in the batch. Models this cache layout does not fit (sliding-window attention,
prompt-learning adapters whose positions peft ignores, hybrid models whose conv or linear-attention layers keep
recurrent states rather than key/value rows) are decoded job by job with ``generate`` once the
running batch has drained.

Hand-written because transformers' continuous batching (``generate_batch``, paged attention) and vLLM's
scheduler do not take peft adapters per row, and S-LoRA/Punica-style mixed-adapter batching is exactly
what this server is for; the tensors are transformers' ``DynamicCache`` layers, nothing else is ours (the batch's bookkeeping is in
``serving.batching``).

Rows, not jobs, are admitted: a job larger than the bounds joins a slice of rows at a time, and its answer is
handed out once every row has ended, in row order, whatever the step each row ended at. Each row of a sampled
job draws from its own generator (seeded from the job's seed and the row's index).
"""

from __future__ import annotations

import time

import torch

from tunelab.generation.constrain import RowMatcher
from tunelab.generation.generate import completion_of, left_pad, render_prompt
from tunelab.generation.stops import StopMatcher, end_of_turn_ids
from tunelab.serving.batching import (Row, Running, device_of, fits_the_cache, group_of, join, keep_rows, loaded,
                                      row_generator)
from tunelab.serving.scheduler import Job, ModelGone, Scheduler, Slice, settle


def _config_of(job: Job):
    """The served model's config: the cache is built per the model's layer kinds, as ``generate`` builds it."""
    served = job.model
    return (served.model if served.backbone is None else served.backbone.base).config


class ContinuousScheduler(Scheduler):
    """:class:`scheduler.Scheduler`'s queue and limits, decoded with iteration-level (continuous) batching.

    ``mix_adapters`` (the server's default): rows of different LoRA adapters of one base share a batch (peft's
    ``adapter_names``); a batch whose rows share one adapter still decodes with the plain forward. On the
    2-core CPU, 16 SmolLM2 requests over two adapters: 38.1 tok/s mixed against 34.9 one adapter per batch
    (``bench/bench_serving.py``, one run; repeats differ by ~10 %: bench/NOTES.md).
    """

    def __init__(self, *args, mix_adapters: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.mix_adapters = mix_adapters
        self.batch: Running | None = None

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.pending and self.batch is None and not self.stopping:
                    self.cond.wait()
                if self.aborted or (not self.pending and self.batch is None):
                    self.batch = None  # past the deadline stop() failed every job: drop the cache and end
                    return
                admitted, alone = self._admit()
            started = time.monotonic()
            try:
                if alone is not None:
                    self._decode_alone(alone)
                if admitted:
                    self._guarded([job for job, _, _ in admitted], lambda jobs: self._prefill(admitted))
                if self.batch is not None:
                    self._guarded([r.job for r in self.batch.rows], lambda jobs: self._step())
            finally:
                if self.batch is not None or admitted:
                    self.on_batch(len(self.batch.rows) if self.batch else 0, time.monotonic() - started)

    def _admit(self) -> tuple[list[Slice], Job | None]:
        """The rows of waiting jobs that join the batch, or a job to decode alone (when no batch runs).

        A new batch takes the oldest job's group and the waiting jobs of that group, in order, while their rows
        fit the bounds (the last may join with part of its rows, the rest waits at the front); a running batch
        takes newcomers of its group only while no job of another group waits, so that job waits at most for
        the batch to drain.
        """
        self._drop_dead()
        if not self.pending:
            return [], None
        if self.batch is None and not fits_the_cache(self.pending[0]):
            return [], self.pending.popleft()
        group = self.batch.group if self.batch else group_of(self.pending[0], self.mix_adapters)
        mine = [j for j in self.pending if group_of(j, self.mix_adapters) == group and fits_the_cache(j)]
        if self.batch is not None and len(mine) < len(self.pending):
            return [], None  # another model's request waits: let this batch drain
        rows = len(self.batch.rows) if self.batch else 0
        tokens = sum(r.job.row_tokens for r in self.batch.rows) if self.batch else 0  # counted as the dynamic one does
        admitted: list[Slice] = []
        for job in mine:
            take = job.rows_that_fit(rows, tokens, self.max_batch_rows, self.max_batch_tokens)
            if not take:
                break
            admitted.append((job, job.taken, job.taken + take))
            job.taken += take
            rows, tokens = rows + take, tokens + take * job.row_tokens
            if job.taken < len(job.prompts):
                break  # its other rows join once some leave
            self.pending.remove(job)
        return admitted, None

    def _guarded(self, jobs: list[Job], work) -> None:
        """Run ``work(jobs)``; a failure fails those jobs (and drops their rows), the worker goes on."""
        try:
            work(jobs)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting requests
            failed = {id(j) for j in jobs}
            for job in jobs:
                settle(job.future, error=exc)
            if self.batch is not None:
                self._keep([i for i, r in enumerate(self.batch.rows) if id(r.job) not in failed])

    def _decode_alone(self, job: Job) -> None:
        """A job whose model the batch's cache does not fit: ``generate`` (or ``stream``) on its own, a slice of
        rows within the bounds at a time."""
        try:
            if job.on_delta is not None:
                self._stream(job)
                return
            size = job.rows_that_fit(0, 0, self.max_batch_rows, self.max_batch_tokens)
            for start in range(0, len(job.prompts), size):
                if self.aborted or job.future.done():
                    return
                self._decode([(job, start, min(start + size, len(job.prompts)))])
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
            settle(job.future, error=exc)

    def _forward(self, rows: list[Row], **inputs) -> tuple[torch.Tensor, object]:
        """Last-position logits of ``rows`` (each through its adapter) and the updated cache, under the registry lock."""
        served = rows[0].job.model
        with self.registry.lock, torch.no_grad():
            backbone = served.backbone
            mixed = len({r.adapter for r in rows}) > 1
            if mixed and backbone is not None and backbone.peft is not None and backbone.peft_type == "LORA":
                backbone.peft.eval()  # peft refuses adapter_names in training mode
                out = backbone.peft(**inputs, adapter_names=[r.adapter for r in rows], use_cache=True, logits_to_keep=1)
            else:  # one model or one adapter: its plain forward (peft's per-row routing costs extra small matmuls)
                with rows[0].job.model.active() as module:
                    module.eval()
                    out = module(**inputs, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float(), out.past_key_values

    def _rows(self, slices: list[Slice]) -> list[Row]:
        """The rows of ``slices``, each prompt rendered once (a request's ``n`` copies share it)."""
        rows = []
        for job, start, stop in slices:
            tokenizer, rendered = job.model.tokenizer, {}
            turn_ends = end_of_turn_ids(tokenizer)
            stop_ids, stops = set(turn_ends), StopMatcher(job.settings.stop)
            for choice in range(start, stop):
                prompt = job.prompts[choice]
                if id(prompt) not in rendered:
                    rendered[id(prompt)] = render_prompt(tokenizer, prompt)
                grammar = RowMatcher(job.constraint, tokenizer, turn_ends) if job.constraint is not None else None
                rows.append(Row(job, choice, rendered[id(prompt)], stop_ids, job.model.adapter or "__base__", stops,
                                row_generator(job, choice), grammar=grammar))
        return rows

    def _prefill(self, slices: list[Slice]) -> None:
        from transformers import DynamicCache

        with self.registry.lock:  # an adapter unloaded past Registry.unload's wait ends its own rows only
            rows = [r for r in self._rows(slices) if self._still_loaded(r)]
            if not rows:
                return
            ids, mask = left_pad([r.prompt for r in rows], 0, device_of(rows[0].job))
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits, cache = self._forward(rows, input_ids=ids, attention_mask=mask, position_ids=positions,
                                          past_key_values=DynamicCache(config=_config_of(rows[0].job)))
        group = self.batch.group if self.batch else group_of(rows[0].job, self.mix_adapters)
        new = Running(group, rows, cache, mask, self._sample(rows, logits))
        self.batch = new if self.batch is None else join(self.batch, new)
        self._advance(new.rows, new.last)

    def _still_loaded(self, row: Row) -> bool:
        if loaded(row):
            return True
        settle(row.job.future, error=ModelGone(f"adapter {row.job.model.id!r} was unloaded while this request "
                                                  "decoded; load it again"))
        return False

    def _step(self) -> None:
        with self.registry.lock:
            if [r for r in list(self.batch.rows) if not self._still_loaded(r)]:
                self._keep([i for i, r in enumerate(self.batch.rows) if loaded(r)])
                if self.batch is None:
                    return
            batch = self.batch
            mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1
            logits, batch.cache = self._forward(batch.rows, input_ids=batch.last[:, None], attention_mask=mask,
                                                position_ids=positions, past_key_values=batch.cache)
        batch.mask = mask
        batch.last = self._sample(batch.rows, logits)
        self._advance(batch.rows, batch.last)

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token: the argmax (greedy), else drawn at its job's temperature and top_p from the row's
        generator; a constrained row chooses among the tokens its grammar allows."""
        for i, row in enumerate(rows):
            if row.grammar is not None:
                row.grammar.mask_(logits[i])
        chosen = logits.argmax(-1)
        for i, row in enumerate(rows):
            settings = row.job.settings
            if settings.greedy:
                continue
            probs = torch.softmax(logits[i] / settings.temperature, -1).cpu()
            if settings.top_p < 1:
                ordered, order = probs.sort(descending=True)
                outside = ordered.cumsum(-1) - ordered > settings.top_p  # keep the smallest set reaching top_p
                probs = probs.scatter(0, order, ordered.masked_fill(outside, 0.0))
            chosen[i] = torch.multinomial(probs, 1, generator=row.generator).item()
        return chosen

    def _advance(self, rows: list[Row], tokens: torch.Tensor) -> None:
        """Append each row's new token, send streamed text, finish the rows that ended and the jobs all of whose rows did.

        Stop strings: the row's tail is decoded once and searched for all its stop strings in one pass.
        """
        for row, token in zip(rows, tokens.tolist()):
            row.out.append(token)
            if row.grammar is not None:
                row.grammar.consume(token)
            settings, tokenizer = row.job.settings, row.job.model.tokenizer
            if row.job.cancelled:
                row.finish = "cancelled"
            elif token in row.stop_ids:
                row.finish = "stop"
            elif row.stops and row.stops.find(tokenizer.decode(row.out[-row.stops.window:], skip_special_tokens=True)) >= 0:
                row.finish = "stop"
            elif len(row.out) >= settings.max_new_tokens:
                row.finish = "length"
            if row.job.on_delta is not None and row.finish != "cancelled":
                self._send(row)
        if any(r.finish for r in self.batch.rows):
            self._finish([r for r in self.batch.rows if r.finish])
            self._keep([i for i, r in enumerate(self.batch.rows) if not r.finish])

    def _send(self, row: Row) -> None:
        ids = row.out[:-1] if row.out[-1] in row.stop_ids else row.out
        text, hit = row.stops.cut(row.job.model.tokenizer.decode(ids, skip_special_tokens=True))
        safe = len(text) if (hit or row.finish) else row.stops.safe_length(text)
        if safe > row.sent:
            row.job.on_delta(text[row.sent:safe])
            row.sent = safe

    def _finish(self, ended: list[Row]) -> None:
        """Hand each ended row's completion to its job; the job's future resolves once all its rows have one."""
        for row in ended:
            job = row.job
            if job.cancelled or job.on_delta is not None:
                settle(job.future, [])  # a client gone away, or a stream whose text went out as deltas
            else:
                job.record(row.choice, [completion_of(job.model.tokenizer, row.out, row.stop_ids, row.stops, len(row.prompt))])

    def _keep(self, keep: list[int]) -> None:
        """Only rows ``keep`` stay in the batch (and the cache); an empty batch ends."""
        if not keep:
            self.batch = None
            with self.cond:
                self.cond.notify_all()
            return
        keep_rows(self.batch, keep)
