"""Pad tokenized examples into a batch of tensors."""

from __future__ import annotations

import torch

from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample


def collate(batch: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example.

    Padding is identified by position (the attention mask), never by id, so ``pad_id`` may equal the
    eos id without hiding real eos tokens from the loss.

    Args:
        batch: Tokenized examples.
        pad_id: Id written into padding positions of ``input_ids``.

    Returns:
        ``input_ids``, ``attention_mask`` (1 for real tokens) and ``labels`` (-100 at padding), all
        ``torch.long`` of shape ``(B, T)`` with ``T`` the longest example.
    """
    if not batch:
        raise ValueError("collate needs at least one example")
    width = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if any(getattr(ex, "vision", None) for ex in batch):  # a VLM's examples: pixel values and image sizes too
        from tunelab.data.vision import merge_vision

        out.update(merge_vision(batch, width))
    return out
