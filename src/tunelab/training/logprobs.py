"""Log-probabilities of given completions under a model, with gradients (for DPO, GRPO and distillation).

``token_logprobs`` is exact for every method, whether or not the LM head trains: where
``tunelab.training.loss.plain_causal_lm`` says logits are exactly ``lm_head(final hidden state)`` (plain
models, LoRA, IA3, adapters inside the decoder), the decoder runs once and only the trained positions are
projected onto the vocabulary, ``chunk_rows`` positions at a time; each chunk's logits, ``log_softmax``
and gather run under ``torch.utils.checkpoint``, so neither forward nor backward ever holds more than one
chunk of N x V float32 logits (backward recomputes one chunk at a time). Prompt and prefix tuning change
the inputs in peft's wrapper, so for them the full logits are formed and the last T positions are used.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from tunelab.training.linear_cross_entropy import chunk_rows as default_chunk_rows
from tunelab.training.loss import plain_causal_lm
from tunelab.training.loss import IGNORE_INDEX, trained_positions


def entropy_of(logp: torch.Tensor) -> torch.Tensor:
    """The entropy (nats) of each row's distribution from its log-probabilities (..., V); no gradient."""
    with torch.no_grad():
        return -(logp.exp() * logp).sum(dim=-1)


def _gathered_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), the entropy of the whole distribution) for each row of ``hidden`` (C, H) under ``head``;
    each (C,) float32."""
    logp = torch.log_softmax(head(hidden).float(), dim=-1)  # (C, V)
    return logp.gather(1, targets[:, None]).squeeze(1), entropy_of(logp)


def _chunked(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_gathered_logprobs` over ``rows`` positions at a time, recomputed per chunk in backward."""
    pieces = []
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start:start + rows], targets[start:start + rows]
        if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters())):
            pieces.append(checkpoint(_gathered_logprobs, head, h, t, use_reentrant=False))
        else:
            pieces.append(_gathered_logprobs(head, h, t))
    if not pieces:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


def _scatter(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1) float32 with ``values`` at the trained positions (in row-major order), 0 elsewhere."""
    batch, seq = labels.shape
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    flat = values.new_zeros(batch * (seq - 1)).index_put((rows * (seq - 1) + cols,), values)
    return flat.view(batch, seq - 1)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor, *,
                   chunk_rows: int | None = None) -> torch.Tensor:
    """log p(labels[t+1] | tokens up to t) at every trained position.

    Args:
        model: A causal LM, plain or PEFT-wrapped; gradients flow to whatever of it trains.
        input_ids: (B, T) token ids (right- or left-padded).
        attention_mask: (B, T), 1 for real tokens; None when there is no padding.
        labels: (B, T) unshifted labels, ``IGNORE_INDEX`` (-100) where no log-probability is wanted;
            position t is scored on ``labels[:, t + 1]``.
        chunk_rows: Positions projected onto the vocabulary at once (default from the vocabulary size,
            as for the training loss).

    Returns:
        (B, T-1) float32 log-probabilities, 0 where ``labels[:, 1:]`` is ``IGNORE_INDEX``.
    """
    return token_logprobs_and_entropy(model, input_ids, attention_mask, labels, chunk_rows=chunk_rows)[0]


def token_logprobs_and_entropy(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor, *,
                               chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_logprobs`, and the entropy of the model's next-token distribution at the same positions
    ((B, T-1) float32 nats, 0 elsewhere, without gradient): computed from the logits already formed, so it costs
    one more reduction over the vocabulary per chunk."""
    inputs = {"input_ids": input_ids, "use_cache": False}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    # The same exactness rule as the training loss; loss.py keeps it private for now (the one place it is decided).
    base = plain_causal_lm(model)
    shifted = labels[:, 1:]  # (B, T-1)
    if base is None:
        logits = model(**inputs).logits[:, -labels.shape[1]:-1]  # (B, T-1, V); prompt tuning puts P virtual tokens first
        logp = torch.log_softmax(logits.float(), dim=-1)
        picked = logp.gather(2, shifted.clamp(min=0)[..., None]).squeeze(2)
        ignored = shifted == IGNORE_INDEX
        return picked.masked_fill(ignored, 0.0), entropy_of(logp).masked_fill(ignored, 0.0)
    hidden = base.model(**inputs).last_hidden_state  # (B, T, H)
    index = trained_positions(labels).to(hidden.device)
    trained_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)  # (N, H)
    targets = labels.reshape(-1).index_select(0, index + 1)  # (N,) the next token of each
    head = base.get_output_embeddings()
    values, entropy = _chunked(head, trained_hidden, targets, chunk_rows or default_chunk_rows(head.weight.shape[0]))
    return _scatter(values, labels), _scatter(entropy, labels)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor, *,
                      chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's trained tokens (B,) float32, their count (B,) long).

    Arguments as for :func:`token_logprobs`; divide the sum by the count for a per-token mean.
    """
    per_token = token_logprobs(model, input_ids, attention_mask, labels, chunk_rows=chunk_rows)
    return per_token.sum(dim=1), (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
