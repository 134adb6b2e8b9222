"""Checkpoints that resume bit-identically, written atomically, in safetensors and JSON only.

A checkpoint holds the trainable parameters, the optimizer state (flattened into safetensors: we never
unpickle files), the RNG states and the step. The learning rate is a pure function of the step
(``schedule.lr_at``) and the data order a pure function of seed and epoch, so nothing else is needed
to continue exactly where the run stopped. accelerate's ``save_state`` pickles RNG state, hence ours.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunelab.atomic import atomic_dir
from tunelab.errors import TunelabError

_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "state.json").is_file()]
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
) -> Path:
    """Write ``root/step-NNNNNNNN`` atomically and delete all but the newest ``keep_last`` checkpoints."""
    target = root / f"step-{step:08d}"
    with atomic_dir(target) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        opt_tensors, param_groups = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        save_file(rng, tmp / "rng.safetensors")
        state = {"step": step, "param_groups": param_groups, "python_random": _python_rng_state(), **extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for old in checkpoint_dirs(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def load_checkpoint(path: Path, trainable: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore parameters, optimizer and RNG states from ``path``; return its state.json contents."""
    state = json.loads((path / "state.json").read_text())
    saved = load_file(path / "trainable.safetensors")
    missing = sorted(set(trainable) - set(saved))
    unexpected = sorted(set(saved) - set(trainable))
    mismatched = [n for n in set(trainable) & set(saved) if saved[n].shape != trainable[n].shape]
    if missing or unexpected or mismatched:
        raise TunelabError(
            f"checkpoint {path} does not fit this model and method (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"different shape {sorted(mismatched)[:3]}); resume with the method options the run started with"
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[name].to(param.device, param.dtype))
    opt_state = _unflatten_optimizer(load_file(path / "optimizer.safetensors"), state["param_groups"])
    optimizer.load_state_dict(opt_state)
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return state
