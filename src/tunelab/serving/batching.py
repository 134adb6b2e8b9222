"""The running batch of continuous batching (``serving.continuous``): its rows, its left-padded KV cache, and
the tensor work of rows joining and leaving it.

The cache is left-padded: every row's newest token is in the last column; rows that join are padded on the
left to the batch's width, rows that leave are indexed out, and columns every remaining row pads are dropped.
The tensors are transformers' ``DynamicCache`` layers; only this bookkeeping is ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.generation.constrain import RowMatcher
from tunelab.generation.generate import ignores_position_ids
from tunelab.generation.stops import StopMatcher
from tunelab.models.anatomy import non_attention_layers
from tunelab.serving.scheduler import Job


@dataclass(eq=False)
class Row:
    """One prompt of a job decoding in the running batch (``choice``: its index among the job's rows)."""

    job: Job
    choice: int
    prompt: list[int]
    stop_ids: set[int]
    adapter: str
    stops: StopMatcher
    generator: torch.Generator | None = None  # the row's own draws when sampling
    grammar: RowMatcher | None = None  # the row's grammar state when its job is constrained
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
    recurrent = config is not None and non_attention_layers(config)  # conv/linear-attention states: no key/value rows to pad
    return not sliding and not recurrent and not ignores_position_ids(module)


def row_generator(job: Job, choice: int) -> torch.Generator | None:
    """The generator row ``choice`` of a sampled job draws from: seeded from the job's seed and the row's index,
    so a seeded answer depends neither on the rest of the batch nor on how the job was split into batches."""
    settings = job.settings
    if settings.greedy:
        return None
    generator = torch.Generator(device="cpu")
    if settings.seed is None:
        generator.seed()
    else:
        generator.manual_seed(hash((settings.seed, choice)) & 0x7FFF_FFFF_FFFF_FFFF)  # ints hash the same in every process
    return generator


def loaded(row: Row) -> bool:
    """Whether the row's adapter is still loaded."""
    backbone = row.job.model.backbone
    return backbone is None or row.adapter == "__base__" or row.adapter in backbone.adapters


def device_of(job: Job) -> torch.device:
    served = job.model
    module = served.model if served.backbone is None else served.backbone.base
    return next(module.parameters()).device


def join(a: Running, b: Running) -> Running:
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


def keep_rows(batch: Running, keep: list[int]) -> None:
    """Only rows ``keep`` (a non-empty list of indices) stay in ``batch`` and its cache; columns every row pads go."""
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
