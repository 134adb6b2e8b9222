"""Summed cross-entropy of ``hidden @ weight.T`` computed in chunks of rows, never holding all the logits.

For N trained positions and a vocabulary of V, the plain ``F.cross_entropy(lm_head(h).float(), t)`` keeps
about 12 bytes per logit alive in backward (the float32 logits, the log-softmax and its gradient): with
long completions or ``data.loss_on: all`` that is most of a step's memory (16k positions x 128k vocabulary
= 25 GB). Here the logits of ``chunk_rows`` positions at a time are formed, reduced to their loss and
turned straight into the gradients of ``hidden`` (and of ``weight`` when it trains); backward only scales
those by the incoming gradient. Same FLOPs as the plain path (the gradient matmuls move into the forward),
peak memory one chunk of logits plus an N x H gradient.

Why hand-written: liger-kernel's fused linear cross-entropy does the same in Triton on CUDA only; this
runs on any device in plain PyTorch (CPU training is a first-class target here) and is checked against
``F.cross_entropy`` by the tests.
"""

from __future__ import annotations

import torch

# Logit elements formed at once: 2**25 float32 logits (128 MiB, ~400 MiB with the softmax and its
# gradient in the compute dtype), e.g. 682 positions of a 49,152-token vocabulary.
CHUNK_ELEMENTS = 2**25


def chunk_rows(vocab: int) -> int:
    """Positions per chunk for a vocabulary of ``vocab`` tokens."""
    return max(1, CHUNK_ELEMENTS // vocab)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             rows: int | None = None) -> torch.Tensor:
    """``F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")``, ``rows`` positions at a time.

    Args:
        hidden: (N, H) final hidden states of the trained positions.
        weight: (V, H) output projection (``lm_head.weight``, possibly tied to the embedding).
        targets: (N,) next-token ids; every position is trained (no ignore index).
        rows: positions per chunk (default :func:`chunk_rows`).
    """
    rows = rows or chunk_rows(weight.shape[0])
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        with torch.no_grad():
            return sum((_chunk_loss(hidden[s:s + rows], weight, targets[s:s + rows])[0]
                        for s in range(0, hidden.shape[0], rows)), hidden.new_zeros((), dtype=torch.float32))
    return _LinearCrossEntropySum.apply(hidden, weight, targets, rows)


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """(summed loss, float32 logits, their log-sum-exp) of one chunk."""
    logits = (hidden @ weight.T).float()  # (C, V); under autocast the matmul runs in the compute dtype
    lse = torch.logsumexp(logits, dim=-1)
    loss = (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum()
    return loss, logits, lse


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, rows):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            loss, logits, lse = _chunk_loss(h, weight, t)
            total += loss
            # d loss / d logits = softmax - one_hot(target), formed in place of the logits
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            if not torch.is_autocast_enabled(h.device.type):  # (autocast casts the matmul inputs itself)
                grad_logits = grad_logits.to(weight.dtype)
            if want_hidden:
                grad_hidden[start:start + rows] = grad_logits @ weight
            if want_weight:
                grad_weight += (grad_logits.T @ h).float()
            del logits, grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_total.to(grad_hidden.dtype) if grad_hidden is not None else None,
                (grad_weight * grad_total).to(ctx.weight_dtype) if grad_weight is not None else None,
                None, None)
