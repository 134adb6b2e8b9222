"""Several processes training one model: which share of a step each rank computes, and the few collectives
the loops need, over torch.distributed (gloo on CPU, NCCL on GPUs).

The engines are the field's: the process group is created by ``accelerate.Accelerator`` from the variables
``torchrun`` (or ``accelerate launch``) sets; DDP comes from ``accelerator.prepare``; FSDP is torch's
``fully_shard`` (FSDP2). accelerate's own FSDP path needs a GPU, and ``fully_shard`` runs on CPU/gloo as on
GPUs, so the same code is tested here and runs there. What is written here is only what those engines leave
to the training loop:

* **The share of a step.** A step's micro-batches are those of one process with ``grad_accum × world``
  micro-batches (the global batch, as in every trainer: per-device batch × accumulation × processes); rank
  ``r`` takes micro-batches ``r, r + world, ...``. When the epoch's last step has fewer, the ranks short of
  one run a *filler* (the step's first micro-batch, weighted 0) so that every rank makes the same number of
  forward/backward passes: DDP and FSDP synchronise inside them, and a rank with one pass less would hang.
* **The loss of a step** is the sum of trained-token losses over every rank's micro-batches divided by the
  step's global count of trained tokens (all-reduced before the first backward). DDP and FSDP *average*
  gradients over ranks, so each rank back-propagates its sum × world / global count: the average is then
  exactly the one-process gradient, within float rounding.
* **Writing.** Only rank 0 writes the run directory (``is_main``); the others wait at a barrier where rank 0
  publishes something they read later.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch

STRATEGIES = ("ddp", "fsdp", "deepspeed")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (``rank 0 of 1`` outside a distributed launch)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_world() -> World:
    """The world ``torchrun``/``accelerate launch`` describe in the environment (before the group exists)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def world() -> World:
    """This process's rank and the number of processes of the initialised group (or of the launch)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return World(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return launched_world()


def is_main() -> bool:
    """True on the process that writes the run directory (rank 0; the only one outside a distributed launch)."""
    return world().main


def process_group_kwargs(timeout_minutes: float) -> list:
    """accelerate's kwargs handler for the process group: how long a collective waits for a slow rank."""
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=timedelta(minutes=timeout_minutes))]


def barrier() -> None:
    if world().distributed:
        torch.distributed.barrier()


def share(items: list, w: World) -> tuple[list, int]:
    """Rank ``w.rank``'s items (``r, r + size, ...``) padded with fillers (``items[0]``) to the count of the
    rank with most; returns (items, number of trailing fillers)."""
    if not w.distributed or not items:
        return list(items), 0
    mine = list(items[w.rank :: w.size])
    fillers = -(-len(items) // w.size) - len(mine)
    return mine + [items[0]] * fillers, fillers


def weighted_share(items: list) -> list[tuple[object, float]]:
    """This rank's :func:`share` of ``items`` as (item, weight) pairs: weight 0 marks a filler. Evaluation
    loops over it and sums with :func:`all_sum`, so each rank computes a part and all get the whole."""
    mine, fillers = share(items, world())
    return [(item, 0.0 if i >= len(mine) - fillers else 1.0) for i, item in enumerate(mine)]


def all_sum(values: list[float] | torch.Tensor, device=None) -> torch.Tensor:
    """The element-wise sum over ranks of ``values`` (a float64 tensor; the values themselves in one process)."""
    if device is None and not torch.is_tensor(values):
        device = _collective_device()
    tensor = torch.as_tensor(values, dtype=torch.float64, device=device)
    if world().distributed:
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
    return tensor


def _collective_device() -> torch.device:
    """Where the group's backend reduces: the GPU for NCCL, the CPU for gloo (and in one process)."""
    if world().distributed and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_objects(value) -> list:
    """``value`` of every rank, in rank order (only this one in one process)."""
    w = world()
    if not w.distributed:
        return [value]
    out = [None] * w.size
    torch.distributed.all_gather_object(out, value)
    return out


def gradient_sync(model, accelerator, sync: bool):
    """A context in which a backward pass does (``sync``) or does not all-reduce gradients: accelerate's
    ``no_sync`` for DDP, ``set_requires_gradient_sync`` for an FSDP2 model, nothing in one process."""
    if sync or not world().distributed:
        return nullcontext()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    return accelerator.no_sync(model)


@contextmanager
def _fsdp_no_sync(model) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def wrapped(model) -> bool:
    """True for a DDP-wrapped or FSDP-sharded model: only its own forward synchronises (or gathers)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return True
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_scale() -> int:
    """The factor each rank's loss is multiplied by so that DDP's and FSDP's average of gradients is their sum."""
    return world().size


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP-sharded ``DTensor`` (a collective: every rank calls it); others as they are."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def local_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like``: sharded the same way when ``like`` is a ``DTensor``, else as it is."""
    if not hasattr(like, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank read the same file, so each cuts its own shard without communicating
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def relayout_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of whole tensors: each FSDP-sharded parameter's moments sharded like it."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            per = optimizer.state.get(p, {})
            for key, value in per.items():
                if torch.is_tensor(value) and value.shape == p.shape and not hasattr(value, "device_mesh"):
                    per[key] = local_like(value, p)


def shard_model(model: torch.nn.Module, cpu_offload: bool = False) -> torch.nn.Module:
    """FSDP2: each decoder block, then the whole model, sharded over the ranks with torch's ``fully_shard``
    (in place; the parameters become ``DTensor`` shards, under the same names)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    options = {"offload_policy": CPUOffloadPolicy()} if cpu_offload else {}
    blocks = [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))]
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def average_outside(model: torch.nn.Module, params) -> None:
    """All-reduce the gradients of trainable tensors that live outside ``model`` (a reward head), which DDP and
    FSDP do not see, into the same average they apply to the model's own."""
    inside = {id(p) for p in model.parameters()}
    for p in params:
        if id(p) not in inside and p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world().size

