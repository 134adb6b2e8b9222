"""Training devices: the GPU catalog (memory, dense peak TFLOP/s), this machine's CPU or CUDA device,
and the runtime overheads and MFU defaults that go with them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import Literal

from tunelab.errors import TunelabError

GiB = 1024**3
GPU_OVERHEAD = int(0.5 * GiB)  # CUDA context + caching-allocator slack (stated assumption)
CPU_OVERHEAD = int(0.4 * GiB)  # RSS of a Python process with torch, transformers and peft imported
# CPU assumptions, measured on the 2-core dev machine (torch 2.13, shared with other jobs): a float32
# matmul of 2048-3072 square reaches 72-80 GFLOP/s (best of 5); SmolLM2-135M training steps reached
# 0.28-0.44 of that, so CPU_MFU is 0.35 like the GPU default. Another CPU differs: pass mfu or tokens.
CPU_MATMUL_GFLOPS = 75.0
CPU_MFU = 0.35
GPU_MFU = 0.35


@dataclass(frozen=True)
class Device:
    """A training device: memory as torch reports it, dense peak TFLOP/s (bf16 tensor core and fp32)."""

    name: str
    kind: Literal["gpu", "cpu"]
    memory_bytes: int
    bf16_tflops: float | None = None  # dense spec (no sparsity)
    fp32_tflops: float | None = None
    measured_bf16_tflops: float | None = None  # achievable dense matmul peak, where measured
    note: str = ""

    def peak_flops(self, precision: str) -> float | None:
        """The FLOP/s the MFU applies to, for a resolved precision (fp32 / bf16 / fp16)."""
        if self.kind == "cpu":
            return CPU_MATMUL_GFLOPS * 1e9
        if precision == "fp32":
            return self.fp32_tflops * 1e12 if self.fp32_tflops else None
        if self.measured_bf16_tflops:
            return self.measured_bf16_tflops * 1e12
        return 0.8 * self.bf16_tflops * 1e12 if self.bf16_tflops else None


def _gpu(name: str, gib: float, bf16: float, fp32: float, measured: float | None = None, note: str = "") -> Device:
    return Device(name, "gpu", int(gib * GiB), bf16, fp32, measured, note)


# Memory: the total torch.cuda reports (a little under the marketing GB). TFLOP/s: dense spec sheets.
GPUS: dict[str, Device] = {
    "h100-80gb": _gpu("h100-80gb", 79.2, 989, 67, 790, "SXM; 790 TFLOP/s bf16 measured (anchors)"),
    "h200": _gpu("h200", 139.8, 989, 67, 790, "141 GB SXM; H100 compute"),
    "a100-80gb": _gpu("a100-80gb", 79.2, 312, 19.5),
    "a100-40gb": _gpu("a100-40gb", 39.4, 312, 19.5),
    "l4": _gpu("l4", 22.0, 121, 30.3),
    "a10g": _gpu("a10g", 22.0, 70, 35, note="AWS's A10 variant"),
    "rtx-4090": _gpu("rtx-4090", 23.6, 165, 82.6, note="bf16 with fp32 accumulate"),
    "rtx-3090": _gpu("rtx-3090", 23.6, 71, 35.6, note="bf16 with fp32 accumulate"),
    "t4": _gpu("t4", 14.6, 8.1, 8.1, note="no native bf16 (emulated at the fp32 rate); fp16 65 TFLOP/s"),
}
# torch.cuda device names -> catalog entries (an A100's variant is told by its memory)
_CUDA_NAMES = (("h200", "h200"), ("h100", "h100-80gb"), ("a100", "a100"), ("a10g", "a10g"), ("4090", "rtx-4090"),
               ("3090", "rtx-3090"), (r"\bl4\b", "l4"), (r"\bt4\b", "t4"))


def _meminfo_total() -> int:
    """Total RAM from /proc/meminfo (no psutil); 0 if unreadable."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def resolve_device(gpu: str | None) -> Device:
    """A catalog GPU by name, ``cpu``, or ``current``/None: this machine's CUDA device, else its CPU.

    Raises:
        TunelabError: an unknown name; the message lists the known ones.
    """
    import torch

    name = (gpu or "current").lower()
    if name in GPUS:
        return GPUS[name]
    if name == "cpu" or (name == "current" and not torch.cuda.is_available()):
        return Device("cpu", "cpu", _meminfo_total(), note=f"{os.cpu_count()} cores; RAM from /proc/meminfo")
    if name == "current":
        props = torch.cuda.get_device_properties(0)
        for pattern, key in _CUDA_NAMES:
            if re.search(pattern, props.name.lower()):
                if key == "a100":
                    key = "a100-80gb" if props.total_memory > 50 * GiB else "a100-40gb"
                return replace(GPUS[key], name=f"current ({props.name})", memory_bytes=props.total_memory)
        return Device(f"current ({props.name})", "gpu", props.total_memory, note="not in the catalog: time unknown")
    raise TunelabError(f"unknown GPU {gpu!r}; known: {', '.join([*GPUS, 'cpu', 'current'])}")
