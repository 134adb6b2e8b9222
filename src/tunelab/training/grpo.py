"""GRPO's two components on plain tensors: group-normalised advantages and the clipped policy-ratio loss.

Papers: GRPO, Shao et al. 2024, "DeepSeekMath" (arXiv:2402.03300); DAPO, Yu et al. 2025 (arXiv:2503.14476:
token-level aggregation, decoupled ``epsilon_high``); Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like
Training" (arXiv:2503.20783: no length or std normalisation); the clipped objective is PPO's (Schulman et al.
2017, arXiv:1707.06347); the KL estimator is Schulman's "k3" (http://joschu.net/blog/kl-approx.html).

Advantages, for the ``G`` completions ``r_1..r_G`` of one prompt (rewards ``(P, G)``)::

    A_i = (r_i - mean_g r) / (s + 1e-4)    s = std_g r (scale "group"), std of all P*G rewards ("batch"),
                                             or no division at all ("none"); std with Bessel's correction.

Loss, per completion token ``t`` of sequence ``i`` (``ratio = exp(logp - old_logp)``)::

    l_it = -min(ratio * A_i, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A_i) + beta * k3_it
    k3_it = exp(ref_logp - logp) - (ref_logp - logp) - 1

aggregated over the completion mask ``m`` as

    grpo:    mean_i ( sum_t m_it l_it / max(1, sum_t m_it) )      (per-sequence means, averaged)
    dr_grpo: sum_it m_it l_it / (N * max_completion_length)        (a constant normaliser)
    dapo:    sum_it m_it l_it / max(1, sum_it m_it)                (every token of the batch weighs the same)

Exactly TRL 1.16's ``scale_rewards`` and ``loss_type`` (``GRPOTrainer``), which is the test oracle
(``tests/unit/test_grpo_loss.py``). Hand-written rather than taken from TRL because TRL computes both inline
in its trainer (``_generate_and_score_completions`` and ``_compute_loss`` need a model, an accelerator and
the trainer's state), so they cannot be called on the log-probabilities of our own loop.

Gradient accumulation: every aggregation above is ``(sum of per-micro-batch parts) / normaliser``, where the
normaliser is a count over the whole step (sequences for grpo, ``N * max_completion_length`` for dr_grpo,
completion tokens for dapo), known from the completion masks before any forward pass. Per micro-batch,
:func:`grpo_normaliser` gives its share of the count and :func:`grpo_loss_sum` its part of the loss; a loop
calls ``(loss_sum / step_count).backward()`` per micro-batch with ``step_count = sum(grpo_normaliser(...))``,
and the sum over micro-batches equals :func:`grpo_loss` of the whole step's batch at once, whatever the
micro-batch sizes (TRL's own accumulation of grpo and dr_grpo divides each micro-batch's mean by the number of
micro-batches instead, which is the same only for equal micro-batches). ``grpo_loss_sum``'s stats are summed
the same way, so the step's sums divided by ``step_count`` are the stats weighted as the loss weighs tokens:
for dapo exactly TRL's logged per-token means; for grpo the mean over sequences of per-sequence means; for
dr_grpo a share of the ``N * max_completion_length`` token budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tunelab.errors import TunelabError

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("grpo", "dr_grpo", "dapo")
STD_EPSILON = 1e-4  # TRL's: keeps a zero-variance group's advantages at exactly 0 instead of 0/0


def group_advantages(rewards: torch.Tensor, scale: str = "group") -> tuple[torch.Tensor, float]:
    """Group-relative advantages of the ``G`` completions of each of ``P`` prompts.

    Args:
        rewards: ``(P, G)`` total reward of each completion, a prompt's completions in one row.
        scale: ``"group"`` divides by each group's std, ``"batch"`` by the std of all rewards, ``"none"``
            only centres (Dr. GRPO); stds are Bessel-corrected, plus ``1e-4`` (as TRL's ``scale_rewards``).

    Returns:
        ``(advantages (P, G), zero_std_share)``: the advantages, and the share of groups whose rewards are
        all equal (within ``torch.isclose`` of a zero std) and so give no learning signal.

    Raises:
        TunelabError: ``scale`` is not one of group, batch, none.
        ValueError: ``rewards`` is not a 2-D tensor or holds NaN/inf.
    """
    if scale not in SCALES:
        raise TunelabError(f"scale_rewards={scale!r}: use one of {', '.join(SCALES)}")
    if rewards.dim() != 2 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty (prompts, generations) tensor, got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards hold NaN or inf; check the reward functions (RewardSet rejects such values)")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    rewards = rewards.double()  # the 1e-4 floor makes tiny stds matter; float32 would round them
    n_generations = rewards.shape[1]
    # One completion per prompt has no spread (Bessel's std would be NaN): TRL treats it as zero std.
    group_std = rewards.std(dim=1, keepdim=True) if n_generations > 1 else torch.zeros_like(rewards[:, :1])
    advantages = rewards - rewards.mean(dim=1, keepdim=True)  # (P, G)
    if scale == "group":
        advantages = advantages / (group_std + STD_EPSILON)
    elif scale == "batch":
        batch_std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        advantages = advantages / (batch_std + STD_EPSILON)
    zero_std = torch.isclose(group_std, torch.zeros_like(group_std))  # (P, 1)
    return advantages.to(out_dtype), zero_std.float().mean().item()


@dataclass
class GrpoLoss:
    """The loss of one batch and what a reporter logs.

    Attributes:
        loss: Scalar loss, aggregated as the aggregation says (``loss_sum / max(1, normaliser)``).
        loss_sum: The micro-batch part of the loss (see :func:`grpo_loss_sum`).
        normaliser: The count ``loss_sum`` is divided by (:func:`grpo_normaliser`).
        stats: Detached means over the batch's completion tokens (TRL's logged metrics): ``clip_ratio/low``
            (ratio below ``1-epsilon`` with a negative advantage), ``clip_ratio/high`` (above ``1+epsilon_high``,
            positive advantage), ``clip_ratio/region`` (either), ``ratio`` (the importance ratio) and, given
            ``ref_logps``, ``kl`` (the k3 estimate of KL(policy || reference) per token).
        stat_sums: The same stats reduced like ``loss_sum`` (detached): divided by the step's normaliser after
            summing over micro-batches, they are weighted as the loss weighs tokens (module docstring).
    """

    loss: torch.Tensor
    loss_sum: torch.Tensor
    normaliser: int
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    stat_sums: dict[str, torch.Tensor] = field(default_factory=dict)


def _check(logps, old_logps, advantages, mask, ref_logps, epsilon, epsilon_high, aggregation, beta, max_completion_length):
    if aggregation not in AGGREGATIONS:
        raise TunelabError(f"loss aggregation {aggregation!r}: use one of {', '.join(AGGREGATIONS)} (dapo is the default)")
    if not (math.isfinite(epsilon) and 0 <= epsilon < 1):
        raise TunelabError(f"epsilon={epsilon}: set it in [0, 1) (0.2 is usual)")
    if epsilon_high is not None and not (math.isfinite(epsilon_high) and epsilon_high >= 0):
        raise TunelabError(f"epsilon_high={epsilon_high}: set it to a number >= 0 (DAPO uses 0.28) or leave it unset")
    if not (math.isfinite(beta) and beta >= 0):
        raise TunelabError(f"beta={beta}: set it to a number >= 0 (0 = no KL term, no reference model)")
    if aggregation == "dr_grpo" and max_completion_length < 1:
        raise TunelabError(f"max_completion_length={max_completion_length}: dr_grpo divides by it; set it >= 1")
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (the reference model's per-token log-probabilities)")
    shapes = {"old_logps": old_logps, "mask": mask, **({"ref_logps": ref_logps} if ref_logps is not None else {})}
    for name, tensor in shapes.items():
        if tensor.shape != logps.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, logps {tuple(logps.shape)}; they must match (N, T)")
    if logps.dim() != 2 or advantages.shape != logps.shape[:1]:
        raise ValueError(f"logps must be (N, T) and advantages (N,), got {tuple(logps.shape)} and {tuple(advantages.shape)}")


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              epsilon: float, epsilon_high: float | None, aggregation: str, max_completion_length: int,
              ref_logps: torch.Tensor | None = None, beta: float = 0.0) -> GrpoLoss:
    """The clipped policy-ratio loss of a batch of completions (formulas in the module docstring).

    Args:
        logps: ``(N, T)`` per-token log-probabilities of the completions under the policy (with gradient).
        old_logps: ``(N, T)`` the same under the policy that sampled them (equal to ``logps`` values on the
            first update of a batch: the ratio is then 1 and only its gradient acts).
        advantages: ``(N,)`` one advantage per completion (:func:`group_advantages`, flattened).
        mask: ``(N, T)`` 1 on completion tokens, 0 on padding.
        epsilon: Lower clip range: the ratio is clipped below at ``1 - epsilon``.
        epsilon_high: Upper clip range (DAPO's clip-higher); ``None`` means ``epsilon``.
        aggregation: ``"grpo"``, ``"dr_grpo"`` or ``"dapo"``.
        max_completion_length: Dr. GRPO's constant normaliser per sequence (the generation cap).
        ref_logps: ``(N, T)`` per-token log-probabilities under the reference; needed when ``beta > 0``,
            logged as ``kl`` whenever given.
        beta: Weight of the k3 KL penalty per token.

    Returns:
        The loss with its micro-batch parts and detached stats; gradients reach only ``logps``.

    Raises:
        TunelabError: An option out of range or an unknown aggregation.
        ValueError: Shapes that do not match, or ``beta > 0`` without ``ref_logps``.
    """
    _check(logps, old_logps, advantages, mask, ref_logps, epsilon, epsilon_high, aggregation, beta, max_completion_length)
    compute = torch.promote_types(logps.dtype, torch.float32)  # bf16 logps: exp(ratio) and sums in fp32 at least
    logps = logps.to(compute)
    old_logps, advantages = old_logps.detach().to(compute), advantages.detach().to(compute)[:, None]  # A: (N, 1)
    mask = mask.to(compute)
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - old_logps)  # (N, T)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)  # (N, T)
    kl = None
    if ref_logps is not None:
        delta = ref_logps.detach().to(compute) - logps
        kl = torch.exp(delta) - delta - 1  # k3: unbiased, always >= 0
        if beta > 0:
            per_token = per_token + beta * kl
    loss_sum = _reduce(per_token, mask, aggregation)
    normaliser = grpo_normaliser(mask, aggregation, max_completion_length)
    values = _stat_values(ratio.detach(), advantages, epsilon, high, None if kl is None else kl.detach())
    tokens = mask.sum().clamp(min=1.0)
    stats = {key: (value * mask).sum() / tokens for key, value in values.items()}
    stat_sums = {key: _reduce(value, mask, aggregation) for key, value in values.items()}
    return GrpoLoss(loss_sum / max(normaliser, 1), loss_sum, normaliser, stats, stat_sums)


def _reduce(values: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """The micro-batch part of an aggregation of per-token ``values`` (N, T): what is later divided by the count."""
    if aggregation == "grpo":
        return ((values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()  # per-sequence means, summed
    return (values * mask).sum()  # dr_grpo and dapo: token sums


def _stat_values(ratio, advantages, low, high, kl) -> dict[str, torch.Tensor]:
    """Per-token values of the logged stats (TRL's definitions of the clip ratios)."""
    is_low = (ratio < 1 - low) & (advantages < 0)
    is_high = (ratio > 1 + high) & (advantages > 0)
    values = {"clip_ratio/low": is_low, "clip_ratio/high": is_high, "clip_ratio/region": is_low | is_high}
    values = {key: value.to(ratio.dtype) for key, value in values.items()}
    values["ratio"] = ratio
    if kl is not None:
        values["kl"] = kl
    return values


def grpo_normaliser(mask: torch.Tensor, aggregation: str, max_completion_length: int) -> int:
    """This micro-batch's share of the step's loss normaliser (completion ``mask`` ``(n, T)``).

    Sequences for grpo, ``n * max_completion_length`` for dr_grpo, completion tokens for dapo; sum it over the
    step's micro-batches (before any forward pass) and divide each :func:`grpo_loss_sum` by ``max(1, total)``.
    """
    if aggregation not in AGGREGATIONS:
        raise TunelabError(f"loss aggregation {aggregation!r}: use one of {', '.join(AGGREGATIONS)} (dapo is the default)")
    if aggregation == "dapo":
        return int(mask.sum().item())
    return mask.shape[0] * (max_completion_length if aggregation == "dr_grpo" else 1)


def grpo_loss_sum(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                  epsilon: float, epsilon_high: float | None, aggregation: str, max_completion_length: int,
                  ref_logps: torch.Tensor | None = None, beta: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss_sum, stat_sums)`` of one micro-batch, for gradient accumulation (module docstring).

    Summed over the micro-batches of a step and divided by the step's count (the sum of :func:`grpo_normaliser`),
    ``loss_sum`` gives :func:`grpo_loss` of the whole step's batch: per-sequence means summed (count: sequences)
    for grpo, masked token losses summed (count: ``N * max_completion_length``) for dr_grpo and (count: completion
    tokens) for dapo. ``stat_sums`` (detached) are reduced the same way. Arguments as :func:`grpo_loss`.
    """
    out = grpo_loss(logps, old_logps, advantages, mask, epsilon=epsilon, epsilon_high=epsilon_high,
                    aggregation=aggregation, max_completion_length=max_completion_length, ref_logps=ref_logps, beta=beta)
    return out.loss_sum, out.stat_sums
