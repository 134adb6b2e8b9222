"""Per-rank memory of a run on N GPUs under each way of sharing the model (``tunelab plan --gpus N``).

Hand-written on top of the one-GPU estimate (``planning.memory``): accelerate and DeepSpeed ship estimators
of weights and optimizer states only (``accelerate estimate-memory``, ``estimate_zero3_model_states_mem_needs``),
without activations or logits, which the one-GPU estimate has. Each strategy divides the components it
shards by N and adds what it keeps on top:

* **DDP**: nothing sharded; the gradient buckets DDP all-reduces hold a second copy of the trained gradients.
* **ZeRO-1**: optimizer states sharded. **ZeRO-2**: optimizer states and gradients sharded.
* **ZeRO-3 / FSDP** (``distributed.strategy: fsdp`` is torch's FSDP2, the same partitioning): weights,
  gradients and optimizer states sharded; the block being computed and the next one (prefetched) are
  gathered whole, so two blocks' weights are added back.

Activations, logits, masks and the runtime overhead stay per rank: each rank computes its own micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.planning.devices import GPUS
from tunelab.planning.memory import MemoryEstimate
from tunelab.planning.shape import ModelShape

STRATEGIES = ("ddp", "zero1", "zero2", "zero3/fsdp")


@dataclass(frozen=True)
class RankMemory:
    """Bytes on each of ``gpus`` ranks under ``strategy``, and on which catalog GPUs that fits."""

    strategy: str
    gpus: int
    total: int
    sharded: tuple[str, ...]  # components divided by the rank count
    fits_on: tuple[str, ...]


def per_rank(memory: MemoryEstimate, shape: ModelShape, gpus: int, strategy: str) -> RankMemory:
    """The one-GPU ``memory`` (at the per-rank micro-batch) spread over ``gpus`` ranks under ``strategy``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    parts = memory.components()
    sharded = {"ddp": (), "zero1": ("optimizer_states",), "zero2": ("optimizer_states", "gradients"),
               "zero3/fsdp": ("weights", "trainable_weights", "optimizer_states", "gradients")}[strategy]
    total = sum(value // gpus if name in sharded else value for name, value in parts.items())
    if strategy == "ddp":
        total += parts["gradients"] or parts["trainable_weights"] or 0  # the all-reduce buckets
    if strategy == "zero3/fsdp" and gpus > 1:
        total += 2 * (parts["weights"] + parts["trainable_weights"]) // max(shape.layers, 1)  # two blocks gathered whole
    fits = tuple(name for name, gpu in GPUS.items() if total <= gpu.memory_bytes)
    return RankMemory(strategy, gpus, total, sharded, fits)


def rank_table(memory: MemoryEstimate, shape: ModelShape, gpus: int) -> list[RankMemory]:
    """:func:`per_rank` for every strategy."""
    return [per_rank(memory, shape, gpus, strategy) for strategy in STRATEGIES]


def print_rank_table(rows: list[RankMemory], console, device_bytes: int, device_name: str) -> None:
    """One row per strategy: GiB per rank, what is sharded, whether it fits on the planned GPU and on which others."""
    from rich.table import Table

    gpus = rows[0].gpus
    table = Table(title=f"Per-rank memory on {gpus} GPUs (micro-batch per rank as configured; global batch x{gpus})")
    short = {"weights": "weights", "trainable_weights": "added", "optimizer_states": "optimizer", "gradients": "grads"}
    for column in ("strategy", "GiB per rank", f"fits {device_name}", "sharded", "smallest GPU"):
        table.add_column(column, justify="right" if column == "GiB per rank" else "left")
    for row in rows:
        smallest = min(row.fits_on, key=lambda name: GPUS[name].memory_bytes, default="none")
        table.add_row(row.strategy, f"{row.total / 2**30:.2f}", "yes" if row.total <= device_bytes else "no",
                      ", ".join(short[s] for s in row.sharded) or "-", smallest)
    console.print(table)
    console.print("[dim]  tunelab runs ddp and fsdp (FSDP2, the ZeRO-3 partitioning); zero1/zero2 are shown for comparison "
                  "with DeepSpeed.[/]")
