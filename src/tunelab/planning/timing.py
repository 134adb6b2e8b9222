"""Training time: the FLOPs per token of a method on a model shape, and the time estimate it feeds."""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.planning.method import PlannedMethod
from tunelab.planning.shape import ModelShape, param_name


@dataclass
class TimeEstimate:
    flops_per_token: float
    tokens_per_epoch: int | None
    tokens_source: str  # where tokens_per_epoch comes from, or why it is unknown
    total_tokens: float | None
    steps: int | None
    peak_flops: float | None  # the FLOP/s the MFU applies to
    mfu: float
    seconds: float | None


def flops_per_token(shape: ModelShape, m: PlannedMethod, row: float, completion: float, checkpointing: int) -> float:
    """Training FLOPs per token (see the ``tunelab.planning`` docstring); ``row`` = mean tokens per row,
    ``checkpointing`` = how many blocks (the first ones) run their forward twice."""
    block = sum(a * b for a, b, _ in shape.linears().values())
    attn = 2 * shape.heads * shape.head_dim * (row + m.virtual_tokens + m.prefix)  # causal QK^T and AV
    in_path = m.input_grad or m.prefix > 0 or "model.embed_tokens.weight" in m.trainable
    total = 0.0
    for i in range(shape.layers):
        trained = sum(a * b for k, (a, b, _) in shape.linears().items() if param_name(i, k) in m.trainable)
        in_path = in_path or trained > 0 or bool(m.lora or m.ia3_out or m.ia3_in or m.adapters)
        total += 2 * block + attn
        if in_path:
            total += 2 * block + 2 * trained + 2 * attn + (2 * block + attn if i < checkpointing else 0)
    head = shape.vocab * shape.hidden * (1.0 if m.full_logits else completion)
    total += 2 * head * (1 + in_path + (shape.head_param in m.trainable))
    return total + 6 * m.extra
