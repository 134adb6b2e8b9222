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
prompt-learning adapters whose positions peft ignores) are decoded job by job with ``generate`` once the
running batch has drained.

Hand-written because transformers' continuous batching (``generate_batch``, paged attention) and vLLM's
scheduler do not take peft adapters per row, and S-LoRA/Punica-style mixed-adapter batching is exactly
what this server is for; the tensors are transformers' ``DynamicCache`` layers, nothing else is ours.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.errors import TunelabError
from tunelab.generation import Completion
from tunelab.generation.generate import completion_of, ignores_position_ids, left_pad, render_prompt
from tunelab.generation.stops import cut_at_stop, end_of_turn_ids, longest_stop
from tunelab.generation.stream import safe_length
from tunelab.serving.scheduler import Job, Scheduler


@dataclass(eq=False)
class Row:
    """One prompt of a job decoding in the running batch."""

    job: Job
    choice: int
    prompt: list[int]
    stop_ids: set[int]
    adapter: str
    out: list[int] = field(default_factory=list)
    sent: int = 0  # characters of a streamed row's text already sent
    finish: str | None = None


@dataclass
class Running:
    """The rows decoding together, their KV cache and attention mask (B, L), and each row's newest token."""

    group: tuple
    rows: list[Row]
    cache: Any
    mask: torch.Tensor
    last: torch.Tensor


def group_of(job: Job, mix_adapters: bool = False) -> tuple:
    """Jobs with the same group can share a forward pass: one model, or one adapter of a base; with
    ``mix_adapters`` every LoRA adapter of one base (and the base) together."""
    served = job.model
    backbone = served.backbone
    if backbone is None:
        return ("model", id(served.model))
    if mix_adapters and (backbone.peft is None or backbone.peft_type == "LORA"):
        return ("lora", id(backbone))
    return ("adapter", id(backbone), served.adapter)


def fits_the_cache(job: Job) -> bool:
    """Whether the job's model decodes with a plain left-padded cache (no sliding window, positions honoured)."""
    served = job.model
    module = served.model if served.backbone is None else served.backbone.base
    config = getattr(module, "config", None)
    sliding = getattr(config, "sliding_window", None) and "sliding_attention" in (getattr(config, "layer_types", None) or ["sliding_attention"])
    return not sliding and not ignores_position_ids(module)


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
        self.joining = 0  # jobs taken off the queue, not yet in the batch (waiting for the registry lock, prefilling)
        self.generators: dict[int, torch.Generator] = {}

    @property
    def depth(self) -> int:
        """Jobs waiting, joining or decoding."""
        return len(self.pending) + self.joining + (len({id(r.job) for r in self.batch.rows}) if self.batch else 0)

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.pending and self.batch is None and not self.stopping:
                    self.cond.wait()
                if not self.pending and self.batch is None:
                    return
                admitted, alone = self._admit()
                self.joining = len(admitted) + (alone is not None)
            started = time.monotonic()
            try:
                if alone is not None:
                    self._decode_alone(alone)
                if admitted:
                    self._guarded(admitted, self._prefill)
                self.joining = 0
                if self.batch is not None:
                    self._guarded([r.job for r in self.batch.rows], lambda jobs: self._step())
            finally:
                if self.batch is not None or admitted:
                    self.on_batch(len(self.batch.rows) if self.batch else 0, time.monotonic() - started)

    def _admit(self) -> tuple[list[Job], Job | None]:
        """The waiting jobs that join the batch, or a job to decode alone (when no batch runs).

        A new batch takes the oldest job's group and every waiting job of that group (others keep their place);
        a running batch takes newcomers of its group only while no job of another group waits, so that job
        waits at most for the batch to drain.
        """
        for job in [j for j in self.pending if j.cancelled]:
            self.pending.remove(job)
            job.future.cancel()
        if not self.pending:
            return [], None
        if self.batch is None and not fits_the_cache(self.pending[0]):
            return [], self.pending.popleft()
        group = self.batch.group if self.batch else group_of(self.pending[0], self.mix_adapters)
        mine = [j for j in self.pending if group_of(j, self.mix_adapters) == group and fits_the_cache(j)]
        if self.batch is not None and len(mine) < len(self.pending):
            return [], None  # another model's request waits: let this batch drain
        rows = len(self.batch.rows) if self.batch else 0
        tokens = sum(len(r.prompt) + r.job.settings.max_new_tokens for r in self.batch.rows) if self.batch else 0
        admitted = []
        for job in mine:
            fits = rows + len(job.prompts) <= self.max_batch_rows and tokens + job.tokens <= self.max_batch_tokens
            if not (fits or (rows == 0 and not admitted)):
                break
            self.pending.remove(job)
            admitted.append(job)
            rows, tokens = rows + len(job.prompts), tokens + job.tokens
        return admitted, None

    def _guarded(self, jobs: list[Job], work) -> None:
        """Run ``work(jobs)``; a failure fails those jobs (and drops their rows), the worker goes on."""
        try:
            work(jobs)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting requests
            failed = {id(j) for j in jobs}
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            if self.batch is not None:
                self._keep([i for i, r in enumerate(self.batch.rows) if id(r.job) not in failed])

    def _decode_alone(self, job: Job) -> None:
        """A job whose model the batch's cache does not fit: ``generate`` (or ``stream``) on its own."""
        try:
            if job.on_delta is not None:
                self._stream(job)
            else:
                self._decode([job])
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
            if not job.future.done():
                job.future.set_exception(exc)

    def _forward(self, rows: list[Row], **inputs) -> tuple[torch.Tensor, Any]:
        """Last-position logits of ``rows`` (each through its adapter) and the updated cache, under the registry lock."""
        served = rows[0].job.model
        with self.registry.lock, torch.no_grad():
            backbone = served.backbone
            mixed = len({r.adapter for r in rows}) > 1
            if mixed and backbone is not None and backbone.peft is not None and backbone.peft_type == "LORA":
                if not all(_loaded(r) for r in rows):
                    raise TunelabError("an adapter was unloaded while its request decoded; load it again")
                backbone.peft.eval()  # peft refuses adapter_names in training mode
                out = backbone.peft(**inputs, adapter_names=[r.adapter for r in rows], use_cache=True, logits_to_keep=1)
            else:  # one model or one adapter: its plain forward (peft's per-row routing costs extra small matmuls)
                with rows[0].job.model.active() as module:
                    module.eval()
                    out = module(**inputs, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float(), out.past_key_values

    def _prefill(self, jobs: list[Job]) -> None:
        rows = []
        for job in jobs:
            tokenizer = job.model.tokenizer
            stop_ids = set(end_of_turn_ids(tokenizer))
            for choice, prompt in enumerate(job.prompts):
                rows.append(Row(job, choice, render_prompt(tokenizer, prompt), stop_ids, job.model.adapter or "__base__"))
            if not job.settings.greedy:
                generator = torch.Generator(device="cpu")
                if job.settings.seed is not None:
                    generator.manual_seed(job.settings.seed)
                else:
                    generator.seed()
                self.generators[id(job)] = generator
        device = _device(jobs[0])
        ids, mask = left_pad([r.prompt for r in rows], 0, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        logits, cache = self._forward(rows, input_ids=ids, attention_mask=mask, position_ids=positions,
                                      past_key_values=DynamicCache())
        new = Running(self.batch.group if self.batch else group_of(jobs[0], self.mix_adapters), rows, cache, mask, self._sample(rows, logits))
        self.batch = new if self.batch is None else _join(self.batch, new)
        self._advance(new.rows, new.last)

    def _step(self) -> None:
        gone = [r for r in self.batch.rows if not _loaded(r)]
        for job in {id(r.job): r.job for r in gone}.values():
            job.future.set_exception(TunelabError(f"adapter {job.model.id!r} was unloaded while this request decoded; load it again"))
        if gone:
            self._keep([i for i, r in enumerate(self.batch.rows) if _loaded(r)])
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
        """Each row's next token: the argmax (greedy), else drawn at its job's temperature and top_p from the job's generator."""
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
            chosen[i] = torch.multinomial(probs, 1, generator=self.generators[id(row.job)]).item()
        return chosen

    def _advance(self, rows: list[Row], tokens: torch.Tensor) -> None:
        """Append each row's new token, send streamed text, finish the rows that ended and the jobs all of whose rows did."""
        for row, token in zip(rows, tokens.tolist()):
            row.out.append(token)
            settings, tokenizer = row.job.settings, row.job.model.tokenizer
            if row.job.cancelled:
                row.finish = "cancelled"
            elif token in row.stop_ids:
                row.finish = "stop"
            elif settings.stop and any(s in tokenizer.decode(row.out[-(longest_stop(settings.stop) + 4):], skip_special_tokens=True)
                                       for s in settings.stop):
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
        text, hit = cut_at_stop(row.job.model.tokenizer.decode(ids, skip_special_tokens=True), row.job.settings.stop)
        safe = len(text) if (hit or row.finish) else safe_length(text, row.job.settings.stop)
        if safe > row.sent:
            row.job.on_delta(text[row.sent:safe])
            row.sent = safe

    def _finish(self, ended: list[Row]) -> None:
        for job in {id(r.job): r.job for r in ended}.values():
            if job.cancelled:
                if not job.future.done():
                    job.future.set_result([])
                continue
            mine = [r for r in self.batch.rows if r.job is job]
            if all(r.finish for r in mine) and not job.future.done():
                self.generators.pop(id(job), None)
                job.future.set_result([] if job.on_delta is not None else [self._answer(r) for r in sorted(mine, key=lambda r: r.choice)])

    def _answer(self, row: Row) -> Completion:
        return completion_of(row.job.model.tokenizer, row.out, row.stop_ids, row.job.settings.stop, len(row.prompt))

    def _keep(self, keep: list[int]) -> None:
        """Only rows ``keep`` stay in the batch (and the cache); columns every row pads are dropped."""
        batch = self.batch
        if not keep:
            self.batch = None
            with self.cond:
                self.cond.notify_all()
            return
        if len(keep) < len(batch.rows):
            index = torch.tensor(keep, device=batch.mask.device)
            batch.rows = [batch.rows[i] for i in keep]
            batch.mask, batch.last = batch.mask[index], batch.last[index]
            for layer in batch.cache.layers:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
        unused = int((batch.mask.sum(0) == 0).long().cumprod(0).sum())
        if unused:
            batch.mask = batch.mask[:, unused:]
            for layer in batch.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]


def _loaded(row: Row) -> bool:
    """Whether the row's adapter is still loaded (an unload between steps ends its request)."""
    backbone = row.job.model.backbone
    return backbone is None or row.adapter == "__base__" or row.adapter in backbone.adapters


def _device(job: Job) -> torch.device:
    served = job.model
    module = served.model if served.backbone is None else served.backbone.base
    return next(module.parameters()).device


def _join(a: Running, b: Running) -> Running:
    """One batch of ``a``'s rows then ``b``'s: the shorter cache padded on the left to the longer one's length."""
    width = max(a.mask.shape[1], b.mask.shape[1])
    for run in (a, b):
        missing = width - run.mask.shape[1]
        if missing:
            run.mask = torch.nn.functional.pad(run.mask, (missing, 0))
            for layer in run.cache.layers:
                layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, missing, 0))
                layer.values = torch.nn.functional.pad(layer.values, (0, 0, missing, 0))
    for mine, theirs in zip(a.cache.layers, b.cache.layers):
        mine.keys, mine.values = torch.cat([mine.keys, theirs.keys]), torch.cat([mine.values, theirs.values])
    return Running(a.group, a.rows + b.rows, a.cache, torch.cat([a.mask, b.mask]), torch.cat([a.last, b.last]))

