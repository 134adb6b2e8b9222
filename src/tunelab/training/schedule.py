"""The training schedule as pure functions, so resuming needs no scheduler or sampler state: the learning
rate of a step, and the micro-batches of an epoch (a shuffle that depends only on seed and epoch)."""

from __future__ import annotations

import math

import torch


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return int(math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0


def lr_at(step: float, *, base_lr: float, total_steps: int, warmup: int, kind: str) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine/linear decay to 0 or constant.

    ``step`` may be fractional (a schedule driven by time, ``train.max_seconds``); the rate never exceeds ``base_lr``.
    """
    if warmup > 0 and step < warmup:
        return base_lr * min(1.0, (step + 1) / warmup)
    if kind == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return base_lr * (1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_batches(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of each micro-batch of one epoch: a shuffle that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_examples, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one pass over ``n_examples``: micro-batches of ``batch_size``, ``grad_accum`` a step."""
    return math.ceil(math.ceil(n_examples / batch_size) / grad_accum)


def total_steps(n_examples: int, *, batch_size: int, grad_accum: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps of a run: ``max_steps`` when set, else ``epochs`` passes (at least one step)."""
    if max_steps:
        return max_steps
    return max(1, math.ceil(epochs * steps_per_epoch(n_examples, batch_size, grad_accum)))


def mixture_epoch_size(own_examples: int, replay_ratio: float | None) -> int:
    """The examples of one epoch of a mixture: the sources' own (the replay's aside), plus the replay's share."""
    return round(own_examples / (1 - replay_ratio)) if replay_ratio else own_examples


def mixture_counts(epoch_size: int, weights: tuple[float, ...]) -> list[int]:
    """How many of an epoch's ``epoch_size`` examples each source gives: ``weight / Σ weights`` of them, rounded
    by largest remainder so they sum to ``epoch_size``."""
    total = sum(weights)
    exact = [epoch_size * w / total for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: epoch_size - sum(counts)]:
        counts[i] += 1
    return counts


def mixture_batches(sizes: tuple[int, ...], weights: tuple[float, ...], epoch_size: int, batch_size: int, seed: int,
                    epoch: int) -> list[list[int]]:
    """Micro-batches of one epoch of a weighted mixture, as indices into the sources concatenated in order.

    Source ``i`` gives :func:`mixture_counts` examples, read through shuffles of itself that depend only on
    (seed, epoch, i), repeated if it gives more than it has; the epoch's examples are then shuffled together
    by (seed, epoch), so a resumed run draws exactly what the interrupted one would have.
    """
    chosen: list[int] = []
    offset = 0
    for i, (size, count) in enumerate(zip(sizes, mixture_counts(epoch_size, weights))):
        picks: list[int] = []
        rounds = 0
        while len(picks) < count:
            generator = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1009 + i) * 101 + rounds)
            picks += torch.randperm(size, generator=generator).tolist()
            rounds += 1
        chosen += [offset + j for j in picks[:count]]
        offset += size
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = [chosen[j] for j in torch.randperm(len(chosen), generator=generator).tolist()]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
