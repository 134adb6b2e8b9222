"""Validation loss and perplexity over a tokenized set, with the training loss's token weighting."""

from __future__ import annotations

import math

import torch

from tunelab.data import TokenizedExample, collate
from tunelab.training import distributed
from tunelab.training.loss import summed_loss_of_batch, to_device, trained_token_count


@torch.no_grad()
def validation_loss(model, examples: list[TokenizedExample], *, batch_size: int, pad_id: int, device, autocast) -> dict[str, float]:
    """Mean loss per trained token over ``examples`` and its perplexity (with several processes each computes a
    share of the batches and all return the whole set's figures).

    Args:
        model: The model under training; put in eval mode for the pass and restored after.
        examples: Tokenized evaluation examples.
        batch_size: Examples per forward pass.
        pad_id: Padding token id.
        device: Where to run.
        autocast: A context-manager factory (``accelerator.autocast``) for mixed precision.
    """
    was_training = model.training
    model.eval()
    total, tokens = torch.zeros((), dtype=torch.float64, device=device), 0.0
    for start, weight in distributed.weighted_share(list(range(0, len(examples), batch_size))):
        batch = collate(examples[start : start + batch_size], pad_id)
        tokens += trained_token_count(batch["labels"]) * weight
        batch = to_device(batch, device)
        with autocast():
            total += summed_loss_of_batch(model, batch).double() * weight
    if was_training:
        model.train()
    total, tokens = distributed.all_sum(torch.stack([total, torch.tensor(tokens, dtype=torch.float64, device=device)]))
    loss = float(total) / max(float(tokens), 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
