"""Knowledge distillation losses at the trained positions: forward KL, reverse KL, generalized JSD.

With ``p_t`` the teacher's and ``p_s`` the student's next-token distributions at temperature ``τ``
(logits / τ), summed over the trained (answer) positions:

* ``forward_kl``: KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s) — word-level KD (Hinton et al. 2015; Kim & Rush 2016);
* ``reverse_kl``: KL(p_s ‖ p_t) — mode-seeking (MiniLLM, Gu et al. 2024);
* ``jsd``: β·KL(p_t ‖ m) + (1−β)·KL(p_s ‖ m) with m = β·p_t + (1−β)·p_s — the generalized JSD of GKD
  (Agarwal et al. 2024), the same parametrisation as TRL's ``GKDTrainer.generalized_jsd_loss`` (β=0 is
  forward KL's gradient direction, β=1 reverse KL's), which is the test oracle.

Hand-written because no library computes them without the full ``positions × vocab`` logits of both
models: here both decoders run once, only trained positions are projected onto the vocabulary,
``chunk_rows`` positions at a time, and each chunk's two projections and divergence run under
``torch.utils.checkpoint`` — no more than one chunk of logits per model is ever held, in forward or
backward. Losses are summed over positions (the step divides by its trained tokens, ``training.optim``),
optionally mixed with the student's cross-entropy: ``(1 − α)·D + α·CE``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunelab.errors import TunelabError
from tunelab.training.linear_cross_entropy import chunk_rows as default_chunk_rows
from tunelab.training.distributed import wrapped
from tunelab.training.loss import IGNORE_INDEX, plain_causal_lm

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, *, beta: float = 0.5,
               temperature: float = 1.0) -> torch.Tensor:
    """(N,) divergence per position between (N, V) student and teacher logits (float32 math)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        return (t.exp() * (t - s)).sum(-1)
    if kind == "reverse_kl":
        return (s.exp() * (s - t)).sum(-1)
    if kind == "jsd":
        if beta <= 0.0:
            return (t.exp() * (t - s)).sum(-1)
        if beta >= 1.0:
            return (s.exp() * (s - t)).sum(-1)
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
        return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    raise TunelabError(f"unknown distillation divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")


def _backbone_and_head(model, who: str):
    base = plain_causal_lm(model)
    if base is None:
        raise TunelabError(f"distillation needs the {who}'s logits to be lm_head(final hidden state) (llama, qwen2/3, mistral, "
                           "phi3, smollm3, olmo2 with LoRA, IA3, adapters, freeze or full); prompt and prefix tuning are not supported")
    return base.model, base.get_output_embeddings()


def _trained_hidden(backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    hidden = backbone(**inputs, use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["trained_index"])


def _wrapped_trained_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits
    return logits.reshape(-1, logits.shape[-1]).index_select(0, batch["trained_index"])


def distill_loss_sum(student, teacher, batch: dict[str, torch.Tensor], *, kind: str, beta: float = 0.5, temperature: float = 1.0,
                     alpha: float = 0.0, chunk_rows: int | None = None,
                     teacher_context: Callable[[], AbstractContextManager] = nullcontext) -> torch.Tensor:
    """Summed ``(1 − α)·divergence + α·cross-entropy`` over the trained positions of ``batch`` (from
    ``training.loss.to_device``: it carries ``trained_index``); gradients reach the student only.

    Every teacher computation runs inside ``teacher_context()``: with the student itself as ``teacher`` and its
    method switched off there (``replay.kl``), the untuned model costs no copy. The context is entered inside
    each checkpointed chunk too, so the recomputation in the backward pass sees the same teacher."""
    t_backbone, t_head = _backbone_and_head(teacher, "teacher")
    if wrapped(student):  # DDP/FSDP: only the wrapper's forward synchronises, so the student's full logits
        s_hidden = _wrapped_trained_logits(student, batch)
        s_head, vocab = torch.nn.Identity(), s_hidden.shape[-1]
    else:
        s_backbone, s_head = _backbone_and_head(student, "student")
        s_hidden, vocab = _trained_hidden(s_backbone, batch), s_head.weight.shape[0]
    with torch.no_grad(), teacher_context():
        t_hidden = _trained_hidden(t_backbone, batch)
    targets = batch["labels"].reshape(-1).index_select(0, batch["trained_index"] + 1)
    rows = chunk_rows or default_chunk_rows(vocab)

    def chunk(s_h: torch.Tensor, t_h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s_logits = s_head(s_h)
        with torch.no_grad(), teacher_context():
            t_logits = t_head(t_h)
        loss = (1 - alpha) * divergence(s_logits, t_logits, kind, beta=beta, temperature=temperature).sum()
        if alpha:
            loss = loss + alpha * F.cross_entropy(s_logits.float(), y, ignore_index=IGNORE_INDEX, reduction="sum")
        return loss

    total = s_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, s_hidden.shape[0], rows):
        piece = slice(start, start + rows)
        total = total + checkpoint(chunk, s_hidden[piece], t_hidden[piece], targets[piece], use_reentrant=False)
    return total


def distill_objective(teacher, *, kind: str, beta: float, temperature: float, alpha: float) -> Callable:
    """``token_loss(student, batch)`` for ``token_loop.run_token_loss``: :func:`distill_loss_sum` against ``teacher``."""
    def token_loss(student, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return distill_loss_sum(student, teacher, batch, kind=kind, beta=beta, temperature=temperature, alpha=alpha)
    return token_loss
