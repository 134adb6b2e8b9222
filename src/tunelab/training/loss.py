"""Token-summed causal-LM loss, so gradient accumulation normalises by trained tokens, not micro-batches.

A mean of per-micro-batch means over-weights short micro-batches; we sum the cross-entropy over every
trained token of a micro-batch and divide by the trained-token count of the whole accumulated step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def trained_token_count(labels: torch.Tensor) -> int:
    """Number of positions whose next token is trained (labels are unshifted, (B, T))."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over trained positions.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) token ids, IGNORE_INDEX where no loss is taken; position t predicts labels[t+1].
    """
    vocab = logits.shape[-1]
    shifted_logits = logits[:, :-1, :].reshape(-1, vocab).float()  # (B*(T-1), V)
    shifted_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")
