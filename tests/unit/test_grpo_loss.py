"""GRPO's advantages and loss: TRL 1.16's GRPOTrainer as the oracle, the papers' formulas written out here,
micro-batch accumulation parity, and the properties a policy gradient must have.

TRL computes its loss inline in ``GRPOTrainer._compute_loss(model, inputs)``; the oracle is a trainer built without
``__init__`` (as in test_preference_losses.py) whose per-token log-probabilities come from a stand-in for
``_get_per_token_logps_and_entropies`` returning our fixed tensor. TRL's advantages are computed inside its
generation step, which cannot run bare, so they are checked against the formula with ``statistics.stdev`` (Bessel)
and TRL's own ``nanstd``.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.training.grpo import (
    AGGREGATIONS,
    group_advantages,
    grpo_loss,
    grpo_loss_sum,
    grpo_normaliser,
)

N, T, MAX_LEN = 8, 7, 9
TOL = dict(rtol=0, atol=1e-5)


def _batch(seed: int = 0, dtype=torch.float64):
    """Fixed completions of 1..T tokens (one of T), log-probs of plausible size, a policy a little off the sampler."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)  # (N, T)
    old = -3 * torch.rand(N, T, generator=g, dtype=dtype)
    logps = (old + 0.6 * torch.rand(N, T, generator=g, dtype=dtype) - 0.3).requires_grad_()  # ratios in ~[0.74, 1.35]
    ref = old + 0.4 * torch.rand(N, T, generator=g, dtype=dtype) - 0.2
    advantages = torch.randn(N, generator=g, dtype=dtype)
    return logps, old, advantages, mask, ref


def _trl_loss(loss_type, logps, old, advantages, mask, ref, *, epsilon, epsilon_high, beta):
    """TRL's GRPOTrainer._compute_loss on our tensors, and the metrics it logged."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    model = SimpleNamespace(training=True)
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1, gather=lambda t: t,
                                  gather_for_metrics=lambda t: t, reduce=lambda t, reduction="sum": t)
    attributes = dict(
        model=model, accelerator=accelerator, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        beta=beta, max_completion_length=MAX_LEN, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", use_vllm=False, vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
    )
    trainer = object.__new__(GRPOTrainer)
    for key, value in attributes.items():
        object.__setattr__(trainer, key, value)
    ids = torch.zeros(N, T, dtype=torch.long)
    inputs = {"prompt_ids": ids[:, :2], "prompt_mask": torch.ones(N, 2, dtype=torch.long), "completion_ids": ids,
              "completion_mask": mask.long(), "advantages": advantages, "old_per_token_logps": old,
              "num_items_in_batch": mask.sum()}
    if beta:
        inputs["ref_per_token_logps"] = ref
    loss = trainer._compute_loss(model, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _ours(aggregation, logps, old, advantages, mask, ref, **options):
    return grpo_loss(logps, old, advantages, mask, aggregation=aggregation, max_completion_length=MAX_LEN,
                     ref_logps=ref, **options)


# ---- TRL as the oracle ----

@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("options", [dict(epsilon=0.2, epsilon_high=None, beta=0.0),
                                     dict(epsilon=0.1, epsilon_high=0.28, beta=0.0),
                                     dict(epsilon=0.2, epsilon_high=0.28, beta=0.04)])
def test_loss_gradient_and_stats_match_trl_grpo_trainer(aggregation, options):
    pytest.importorskip("trl")
    logps, old, advantages, mask, ref = _batch(seed=1)
    ours = _ours(aggregation, logps, old, advantages, mask, ref if options["beta"] else None, **options)
    theirs, metrics = _trl_loss(aggregation, logps, old, advantages, mask, ref, **options)
    torch.testing.assert_close(ours.loss, theirs, **TOL)
    torch.testing.assert_close(torch.autograd.grad(ours.loss, logps)[0], torch.autograd.grad(theirs, logps)[0], **TOL)
    for key in ("clip_ratio/low", "clip_ratio/high", "clip_ratio/region"):
        assert ours.stats[key].item() == pytest.approx(metrics[f"{key}_mean"], abs=1e-6)
    assert ours.stats["clip_ratio/region"] > 0  # the fixed batch does clip, so the check has teeth
    if options["beta"]:
        assert ours.stats["kl"].item() == pytest.approx(metrics["kl"], abs=1e-6)


# ---- the papers' aggregations, written out independently ----

def _per_token_objective(logps, old, advantages, ref, eps_low, eps_high, beta):
    """PPO's clipped surrogate per token (as a loss), plus beta times k3, in plain Python loops."""
    rows = []
    for i in range(N):
        a, row = advantages[i].item(), []
        for t in range(T):
            ratio = torch.exp(logps[i, t] - old[i, t]).item()
            surrogate = min(ratio * a, min(max(ratio, 1 - eps_low), 1 + eps_high) * a)
            d = ref[i, t].item() - logps[i, t].item()
            row.append(-surrogate + beta * (math.exp(d) - d - 1))
        rows.append(row)
    return rows


def test_aggregations_match_the_grpo_dapo_and_dr_grpo_formulas():
    logps, old, advantages, mask, ref = _batch(seed=2)
    per_token = _per_token_objective(logps, old, advantages, ref, 0.2, 0.28, 0.05)
    lengths = [int(m.sum()) for m in mask]
    token_sum = sum(per_token[i][t] for i in range(N) for t in range(lengths[i]))
    expected = {
        "grpo": sum(sum(per_token[i][:lengths[i]]) / lengths[i] for i in range(N)) / N,  # DeepSeekMath eq. 3
        "dapo": token_sum / sum(lengths),  # DAPO eq. 8: 1 / sum_i |o_i| over all tokens
        "dr_grpo": token_sum / (N * MAX_LEN),  # Dr. GRPO: a constant instead of |o_i|
    }
    for aggregation, value in expected.items():
        out = _ours(aggregation, logps, old, advantages, mask, ref, epsilon=0.2, epsilon_high=0.28, beta=0.05)
        assert out.loss.item() == pytest.approx(value, abs=1e-9)


# ---- accumulation over micro-batches ----

@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batch_sums_equal_the_whole_batch_loss_gradient_and_stats(aggregation):
    logps, old, advantages, mask, ref = _batch(seed=3)
    options = dict(epsilon=0.2, epsilon_high=0.28, aggregation=aggregation, max_completion_length=MAX_LEN, beta=0.1)
    whole = grpo_loss(logps, old, advantages, mask, ref_logps=ref, **options)
    cuts = [slice(0, 3), slice(3, 4), slice(4, N)]  # unequal micro-batches, each trimmed to its longest completion
    parts = [(s, int(mask[s].sum(-1).max())) for s in cuts]
    count = sum(grpo_normaliser(mask[s, :w].bool(), aggregation, MAX_LEN) for s, w in parts)  # before any forward
    assert count == whole.normaliser == {"grpo": N, "dr_grpo": N * MAX_LEN, "dapo": int(mask.sum())}[aggregation]
    total, stat_sums = 0.0, defaultdict(float)
    for s, w in parts:
        loss_sum, sums = grpo_loss_sum(logps[s, :w], old[s, :w], advantages[s], mask[s, :w], ref_logps=ref[s, :w], **options)
        total = total + loss_sum / count  # what the loop backpropagates per micro-batch
        for key, value in sums.items():
            assert not value.requires_grad
            stat_sums[key] = stat_sums[key] + value
    torch.testing.assert_close(total, whole.loss, **TOL)
    torch.testing.assert_close(torch.autograd.grad(total, logps)[0], torch.autograd.grad(whole.loss, logps)[0], **TOL)
    assert set(stat_sums) == set(whole.stats) == {"clip_ratio/low", "clip_ratio/high", "clip_ratio/region", "ratio", "kl"}
    for key, value in stat_sums.items():
        torch.testing.assert_close(value / count, whole.stat_sums[key] / whole.normaliser, **TOL)
        if aggregation == "dapo":  # token-weighted like the loss: exactly the per-token means TRL logs
            torch.testing.assert_close(value / count, whole.stats[key], **TOL)


# ---- properties of the objective ----

def _on_policy(seed=4):
    logps, _, advantages, mask, ref = _batch(seed=seed)
    return logps, logps.detach().clone(), advantages, mask, ref


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_on_policy_the_loss_is_minus_the_mean_advantage_and_raises_good_completions(aggregation):
    logps, old, _, mask, _ = _on_policy()
    advantages = torch.linspace(-1.0, 1.5, N, dtype=torch.float64)
    out = _ours(aggregation, logps, old, advantages, mask, None, epsilon=0.2, epsilon_high=None)
    grad = torch.autograd.grad(out.loss, logps)[0]
    assert (grad[advantages > 0][mask[advantages > 0].bool()] < 0).all()  # descending raises their log-probs
    assert (grad[advantages < 0][mask[advantages < 0].bool()] > 0).all()
    assert (grad[mask == 0] == 0).all()  # padding gets nothing
    positive = _ours(aggregation, logps, old, torch.full((N,), 0.7, dtype=torch.float64), mask, None,
                     epsilon=0.2, epsilon_high=None)
    assert positive.loss.item() < 0 and out.stats["ratio"].item() == pytest.approx(1.0)
    assert positive.stats["clip_ratio/region"].item() == 0.0


def test_gradients_flow_only_through_the_policy_log_probs():
    logps, old, advantages, mask, ref = _batch(seed=5)
    old, advantages, ref = old.requires_grad_(), advantages.requires_grad_(), ref.requires_grad_()
    out = _ours("dapo", logps, old, advantages, mask, ref, epsilon=0.2, epsilon_high=None, beta=0.1)
    out.loss.backward()
    assert logps.grad is not None and torch.isfinite(logps.grad).all()
    assert old.grad is None and advantages.grad is None and ref.grad is None
    assert all(not v.requires_grad for v in out.stats.values()) and isinstance(out.normaliser, int)


def test_clipping_stops_the_gradient_of_tokens_past_the_trust_region():
    logps, old, _, mask, _ = _on_policy()
    old = old - 0.5  # every ratio e^0.5 = 1.65 > 1.28
    up = _ours("dapo", logps, old, torch.ones(N, dtype=torch.float64), mask, None, epsilon=0.2, epsilon_high=0.28)
    assert torch.autograd.grad(up.loss, logps)[0].abs().max() == 0  # good completions already pushed far enough
    assert up.stats["clip_ratio/high"].item() == 1.0 and up.stats["clip_ratio/low"].item() == 0.0
    down = _ours("dapo", logps, old, -torch.ones(N, dtype=torch.float64), mask, None, epsilon=0.2, epsilon_high=0.28)
    assert torch.autograd.grad(down.loss, logps)[0][mask.bool()].gt(0).all()  # a bad one pushed up still gets pulled back


def test_kl_is_zero_at_the_reference_and_positive_away_from_it():
    logps, old, advantages, mask, _ = _on_policy()
    at_ref = _ours("dapo", logps, old, advantages, mask, logps.detach(), epsilon=0.2, epsilon_high=None, beta=0.5)
    plain = _ours("dapo", logps, old, advantages, mask, None, epsilon=0.2, epsilon_high=None)
    assert at_ref.stats["kl"].item() == 0.0
    torch.testing.assert_close(at_ref.loss, plain.loss)
    away = _ours("dapo", logps, old, advantages, mask, logps.detach() - 0.3, epsilon=0.2, epsilon_high=None, beta=0.5)
    assert away.stats["kl"].item() > 0 and away.loss > plain.loss
    logged_only = _ours("dapo", logps, old, advantages, mask, logps.detach() - 0.3, epsilon=0.2, epsilon_high=None)
    assert logged_only.stats["kl"] > 0 and torch.allclose(logged_only.loss, plain.loss)


def test_bfloat16_log_probs_are_computed_in_float32():
    logps, old, advantages, mask, _ = _batch(seed=6, dtype=torch.float32)
    out16 = _ours("grpo", logps.detach().bfloat16().requires_grad_(), old.bfloat16(), advantages, mask, None,
                  epsilon=0.2, epsilon_high=None)
    assert out16.loss.dtype == torch.float32 and torch.isfinite(out16.loss)


def test_empty_completions_do_not_divide_by_zero():
    logps, old, advantages, mask, _ = _batch(seed=7)
    for aggregation in AGGREGATIONS:
        out = _ours(aggregation, logps, old, advantages, torch.zeros_like(mask), None, epsilon=0.2, epsilon_high=None)
        assert out.loss.item() == 0.0 and out.stats["ratio"].item() == 0.0
    assert grpo_normaliser(torch.zeros(2, 3), "dapo", MAX_LEN) == 0


def test_bad_options_and_shapes_are_reported():
    logps, old, advantages, mask, ref = _batch()
    base = dict(epsilon=0.2, epsilon_high=None, aggregation="dapo", max_completion_length=MAX_LEN)
    with pytest.raises(TunelabError, match="aggregation 'bnpo'.*grpo, dr_grpo, dapo"):
        grpo_loss(logps, old, advantages, mask, **{**base, "aggregation": "bnpo"})
    with pytest.raises(TunelabError, match="epsilon=1.5"):
        grpo_loss(logps, old, advantages, mask, **{**base, "epsilon": 1.5})
    with pytest.raises(TunelabError, match="epsilon_high=-0.1"):
        grpo_loss(logps, old, advantages, mask, **{**base, "epsilon_high": -0.1})
    with pytest.raises(TunelabError, match="beta=-1"):
        grpo_loss(logps, old, advantages, mask, **base, beta=-1.0)
    with pytest.raises(TunelabError, match="max_completion_length=0"):
        grpo_loss(logps, old, advantages, mask, **{**base, "aggregation": "dr_grpo", "max_completion_length": 0})
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, old, advantages, mask, **base, beta=0.1)
    with pytest.raises(ValueError, match="mask has shape"):
        grpo_loss(logps, old, advantages, mask[:, :3], **base)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logps, old, advantages[:3], mask, **base)
    with pytest.raises(TunelabError, match="aggregation"):
        grpo_normaliser(mask, "mean", MAX_LEN)


# ---- advantages ----

def _rewards():
    return torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.2, 0.9, 0.4, 0.0]], dtype=torch.float64)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_the_formula_with_bessel_std_and_trl_epsilon(scale):
    rewards = _rewards()
    advantages, zero_share = group_advantages(rewards, scale)
    flat = rewards.flatten().tolist()
    for p, row in enumerate(rewards.tolist()):
        spread = {"group": statistics.stdev(row), "batch": statistics.stdev(flat), "none": None}[scale]
        for g, r in enumerate(row):
            centred = r - statistics.mean(row)
            expected = centred if spread is None else centred / (spread + 1e-4)
            assert advantages[p, g].item() == pytest.approx(expected, abs=1e-9)
    assert zero_share == pytest.approx(1 / 3)  # the constant group, whatever the scale
    assert advantages[1].abs().max() == 0 and advantages.dtype == torch.float64


def test_advantages_std_is_trls_nanstd():
    pytest.importorskip("trl")
    from trl.trainer.utils import nanstd

    rewards = _rewards().float()
    advantages, _ = group_advantages(rewards, "group")
    expected = (rewards - rewards.mean(1, keepdim=True)) / (nanstd(rewards, dim=1)[:, None] + 1e-4)
    torch.testing.assert_close(advantages, expected, **TOL)
    advantages, _ = group_advantages(rewards, "batch")
    torch.testing.assert_close(advantages, (rewards - rewards.mean(1, keepdim=True)) / (nanstd(rewards) + 1e-4), **TOL)


def test_advantages_edge_cases_and_errors():
    single, share = group_advantages(torch.tensor([[0.3], [0.8]]), "group")  # one completion per prompt: no signal
    assert single.abs().max() == 0 and share == 1.0
    integer, _ = group_advantages(torch.tensor([[1, 0]]), "none")
    assert integer.dtype == torch.float32 and integer.tolist() == [[0.5, -0.5]]
    with pytest.raises(TunelabError, match="scale_rewards='std'.*group, batch, none"):
        group_advantages(_rewards(), "std")
    with pytest.raises(ValueError, match="prompts, generations"):
        group_advantages(torch.ones(4), "group")
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([[1.0, float("nan")]]), "group")
