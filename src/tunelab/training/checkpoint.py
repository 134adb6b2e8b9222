"""Checkpoints that resume bit-identically, written atomically and durably, in safetensors and JSON only.

A checkpoint holds the trainable parameters, the optimizer state (flattened into safetensors: we never
unpickle files), the RNG states and the step. The learning rate is a pure function of the step
(``schedule.lr_at``) and the data order a pure function of seed and epoch, so nothing else is needed
to continue exactly where the run stopped. accelerate's ``save_state`` pickles RNG state, hence ours.

A checkpoint is published by one rename after all its files are on disk (``tunelab.atomic``), and older
ones are deleted only after that. Loading reads and checks every file before anything is copied into the
model, optimizer or RNGs, so a damaged checkpoint changes nothing and ``load_latest_checkpoint`` can fall
back to the one before it. A checkpoint that reads fine but does not fit the model is the user's change of
method options, not damage: that stays an error.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tunelab.atomic import atomic_dir, fsync_dir, make_temp_dir, recover_output
from tunelab.errors import TunelabError
from tunelab.training.distributed import local_like, relayout_optimizer_state, world

_NAME = re.compile(r"^step-(\d{8})$")
_TEMPORARY = re.compile(r"^\.(step-\d{8})\.(tmp|old)-")  # names atomic_dir (and pruning) give in-flight dirs
_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # per-parameter state shaped like the parameter


class UnreadableCheckpointError(TunelabError):
    """A checkpoint's files are missing, truncated or malformed (as opposed to not fitting the model)."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"checkpoint {path} cannot be read: {reason}; delete it to resume from the one before it")


@dataclass(frozen=True)
class Restored:
    """The checkpoint a run resumed from: its directory, its step and its state.json contents."""

    path: Path
    step: int
    state: dict[str, Any]


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    return [p for p in _step_dirs(root) if (p / "state.json").is_file()]


def _step_dirs(root: Path) -> list[Path]:
    """Every ``step-NNNNNNNN`` directory under ``root``, complete or not, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors: dict[str, torch.Tensor] = {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{index}.{key}"] = tensor.detach().cpu().contiguous()
    return tensors, state_dict["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    return {"state": state, "param_groups": param_groups}


def save_checkpoint(
    root: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    keep_last: int,
    other_ranks: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``root/step-NNNNNNNN`` atomically and durably, then delete all but the newest ``keep_last``.

    Temporaries a killed run left in ``root`` are removed first. The checkpoint just written is always kept
    (also when a newer-numbered one exists), and older ones are deleted only once it is safely on disk.
    ``other_ranks`` (several processes): the :func:`rng_states` of ranks 1, 2, ..., which rank 0 writes
    beside its own so each rank resumes with its own random streams.
    """
    _remove_temporaries(root)
    target = root / f"step-{step:08d}"
    with atomic_dir(target) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        opt_tensors, param_groups = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        own = rng_states()
        rng = dict(own["torch"])
        python_ranks = {}
        for rank, states in enumerate(other_ranks or [], start=1):
            rng.update({f"rank{rank}/{name}": tensor for name, tensor in states["torch"].items()})
            python_ranks[str(rank)] = states["python_random"]
        save_file(rng, tmp / "rng.safetensors")
        state = {"step": step, "param_groups": param_groups, "python_random": own["python_random"],
                 **({"python_random_ranks": python_ranks} if python_ranks else {}), **extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    _prune(root, target, keep_last)
    return target


def _remove_temporaries(root: Path) -> None:
    """Remove the half-written or half-deleted checkpoint directories of a run killed mid-save (those of a process
    still running are kept), and put back a checkpoint that was killed while being replaced (``atomic.recover_output``)."""
    if not root.is_dir():
        return
    for name in sorted({m.group(1) for entry in root.iterdir() if (m := _TEMPORARY.match(entry.name))}):
        recover_output(root / name)


def _prune(root: Path, keep: Path, keep_last: int) -> None:
    """Delete all checkpoints but ``keep`` and the newest ``keep_last - 1`` others.

    Each is first renamed to a temporary name, so a kill mid-delete never leaves a checkpoint with some of
    its files gone under a checkpoint's name (the next save removes the remains).
    """
    others = [p for p in _step_dirs(root) if p != keep]
    doomed = others[: max(len(others) - (max(keep_last, 1) - 1), 0)]
    moved = []
    for old in doomed:
        hole = make_temp_dir(root, old.name, "tmp")  # "tmp", never "old": what is half-deleted must not come back
        os.replace(old, hole)  # onto the fresh empty directory: POSIX rename replaces it
        moved.append(hole)
    if moved:
        fsync_dir(root)
    for hole in moved:
        shutil.rmtree(hole, ignore_errors=True)


def rng_states() -> dict[str, Any]:
    """This process's random states: torch's (CPU and every CUDA device) and Python's."""
    torch_states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            torch_states[f"torch_cuda_{i}"] = state
    return {"torch": torch_states, "python_random": _python_rng_state()}


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


@dataclass(frozen=True)
class _Contents:
    """Everything read from one checkpoint, checked, not yet applied."""

    state: dict[str, Any]
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]
    python_random: tuple


def _read(path: Path) -> _Contents:
    """Read and check every file of the checkpoint at ``path``; raise UnreadableCheckpointError if any is bad."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        trainable = load_file(path / "trainable.safetensors")
        opt_tensors = load_file(path / "optimizer.safetensors")
        rng = load_file(path / "rng.safetensors")
    except (OSError, ValueError, SafetensorError) as error:  # JSON and UTF-8 decoding errors are ValueErrors
        raise UnreadableCheckpointError(path, f"{type(error).__name__}: {error}") from None
    python_random = _check_state(path, state)
    _check_rng(path, rng)
    if any(not re.fullmatch(r"\d+\..+", name) for name in opt_tensors):
        raise UnreadableCheckpointError(path, "optimizer.safetensors holds tensors not named '<index>.<key>'")
    optimizer = _unflatten_optimizer(opt_tensors, state["param_groups"])
    return _Contents(state, trainable, optimizer, rng, python_random)


def _check_state(path: Path, state: Any) -> tuple:
    """Check state.json's structure; return the Python RNG state it holds, ready for ``random.setstate``."""
    def bad(what: str) -> UnreadableCheckpointError:
        return UnreadableCheckpointError(path, f"state.json {what}")

    if not isinstance(state, dict):
        raise bad("is not a JSON object")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise bad(f"has no valid step (found {step!r})")
    named = _NAME.match(path.name)
    if named and int(named.group(1)) != step:
        raise bad(f"says step {step}, the directory name step {int(named.group(1))}")
    groups = state.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise bad("has no valid param_groups")
    try:
        version, internal, gauss = state["python_random"]
        python_random = (version, tuple(internal), gauss)
        random.Random().setstate(python_random)  # a throwaway generator: check without touching the real one
    except (KeyError, TypeError, ValueError) as error:
        raise bad(f"has no valid python_random state ({type(error).__name__}: {error})") from None
    return python_random


def _check_rng(path: Path, rng: dict[str, torch.Tensor]) -> None:
    expected = torch.get_rng_state()
    cpu = rng.get("torch_cpu")
    if cpu is None or cpu.dtype != expected.dtype or cpu.shape != expected.shape:
        raise UnreadableCheckpointError(path, "rng.safetensors holds no valid torch_cpu state")
    if any(k.startswith("torch_cuda_") and v.dtype != torch.uint8 for k, v in rng.items()):
        raise UnreadableCheckpointError(path, "rng.safetensors holds an invalid CUDA RNG state")


def _check_fits(path: Path, contents: _Contents, trainable: dict[str, torch.Tensor],
                optimizer: torch.optim.Optimizer) -> None:
    """Raise TunelabError if the checkpoint is for other parameters, UnreadableCheckpointError if its
    optimizer state contradicts its own parameters."""
    saved = contents.trainable
    missing = sorted(set(trainable) - set(saved))
    unexpected = sorted(set(saved) - set(trainable))
    mismatched = [n for n in set(trainable) & set(saved) if saved[n].shape != trainable[n].shape]
    groups = contents.optimizer["param_groups"]
    group_sizes = [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]
    if missing or unexpected or mismatched or group_sizes:
        raise TunelabError(
            f"checkpoint {path} does not fit this model and method (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, different shape {sorted(mismatched)[:3]}"
            f"{', different optimizer parameter groups' if group_sizes else ''}); "
            "resume with the method options the run started with"
        )
    # The optimizer state is keyed by the saved groups' indices, which load_state_dict maps onto ours in order.
    shapes = {i: p.shape for saved_group, group in zip(groups, optimizer.param_groups)
              for i, p in zip(saved_group["params"], group["params"])}
    for index, per_param in contents.optimizer["state"].items():
        if index not in shapes:
            raise UnreadableCheckpointError(path, f"optimizer state for parameter {index}, which no group holds")
        for key in _ADAM_MOMENTS:
            if key in per_param and per_param[key].shape != shapes[index]:
                raise UnreadableCheckpointError(path, f"optimizer {key} of parameter {index} has the wrong shape")


def load_checkpoint(path: Path, trainable: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore parameters, optimizer and RNG states from ``path``; return its state.json contents.

    Every file is read and checked before anything is changed, so on an error the parameters, optimizer
    and RNGs are as they were.

    Raises:
        UnreadableCheckpointError: a file is missing, truncated or malformed.
        TunelabError: the checkpoint holds other parameters than ``trainable`` (other method options).
    """
    contents = _read(path)
    _check_fits(path, contents, trainable, optimizer)
    optimizer.load_state_dict(contents.optimizer)
    relayout_optimizer_state(optimizer)
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(local_like(contents.trainable[name].to(param.device, param.dtype), param))
    rng, python_random = _own_rng(contents)
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(python_random)
    return contents.state


def _own_rng(contents: _Contents) -> tuple[dict[str, torch.Tensor], tuple]:
    """This rank's torch and Python random states from a checkpoint (rank 0's in one process)."""
    rank = world().rank
    prefix = f"rank{rank}/"
    saved = (contents.state.get("python_random_ranks") or {}).get(str(rank))
    if rank == 0 or f"{prefix}torch_cpu" not in contents.rng or saved is None:
        return {k: v for k, v in contents.rng.items() if "/" not in k}, contents.python_random
    version, internal, gauss = saved
    return {k[len(prefix):]: v for k, v in contents.rng.items() if k.startswith(prefix)}, (version, tuple(internal), gauss)


def load_latest_checkpoint(
    root: Path,
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    *,
    on_skip: Callable[[Path, str], None] | None = None,
) -> Restored | None:
    """Restore the newest checkpoint under ``root`` that can be read, falling back past damaged ones.

    Args:
        root: the run's checkpoints directory.
        trainable: the parameters to restore, by name.
        optimizer: the optimizer over those parameters.
        on_skip: called as ``on_skip(path, reason)`` for each checkpoint skipped because it cannot be read;
            by default a warning is issued.

    Returns:
        The checkpoint restored, or None when there is none that can be read (nothing is then changed).

    Raises:
        TunelabError: the newest readable checkpoint holds other parameters (the method options changed):
            falling back would not help, and resuming from a different model must not happen silently.
    """
    skip = on_skip or _warn_skip
    for path in reversed(_step_dirs(root)):
        try:
            state = load_checkpoint(path, trainable, optimizer)
        except UnreadableCheckpointError as error:
            skip(path, error.reason)
            continue
        return Restored(path, state["step"], state)
    return None


def _warn_skip(path: Path, reason: str) -> None:
    warnings.warn(f"skipping checkpoint {path}: {reason}", RuntimeWarning, stacklevel=3)
