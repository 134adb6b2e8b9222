"""Preference losses: a contract matrix over the registry, ORPO and SimPO against formulas written out here,
and TRL's DPOTrainer / RewardTrainer (and its experimental CPO / ORPO trainers) as the oracle.

TRL 1.16 computes its losses inline in ``DPOTrainer._compute_loss`` (and ``RewardTrainer.compute_loss``)
from the model's outputs, so the oracle is a trainer built without ``__init__`` (no model, data or
accelerator setup), given the few attributes those methods read and a stand-in model whose per-token
log-probabilities sum to our fixed summed log-probabilities, spread over a completion mask of the given
lengths (so IPO's length normalisation sees the same token counts).
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.training.preference import (
    PreferenceInputs,
    PreferenceOptions,
    get_preference_loss,
    preference_loss_names,
    register_preference_loss,
    reward_pair_loss,
)

B = 5
TOL = dict(rtol=0, atol=1e-5)


def _inputs(seed: int = 0, dtype=torch.float64, **overrides) -> PreferenceInputs:
    """Fixed pairs: summed log-probs of plausible size (-3..-0.5 nats per token), 3..9 tokens per completion."""
    g = torch.Generator().manual_seed(seed)
    chosen_tokens = torch.randint(3, 10, (B,), generator=g)
    rejected_tokens = torch.randint(3, 10, (B,), generator=g)

    def summed(tokens):
        return (-(0.5 + 2.5 * torch.rand(B, generator=g, dtype=dtype)) * tokens).requires_grad_()

    def near(logps):  # a reference a few nats from the policy, as after some training (no pair saturates hinge)
        return logps.detach() + 2 * torch.rand(B, generator=g, dtype=dtype) - 1

    chosen, rejected = summed(chosen_tokens), summed(rejected_tokens)
    fields = dict(policy_chosen_logps=chosen, policy_rejected_logps=rejected,
                  ref_chosen_logps=near(chosen), ref_rejected_logps=near(rejected),
                  chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
                  chosen_nll=torch.rand(B, generator=g, dtype=dtype) + 1.0)
    return PreferenceInputs(**{**fields, **overrides})


def _shifted(inputs: PreferenceInputs, chosen_shift: float) -> PreferenceInputs:
    """The same pairs with the chosen completions ``chosen_shift`` nats more likely under the policy."""
    return PreferenceInputs(**{**inputs.__dict__, "policy_chosen_logps": inputs.policy_chosen_logps.detach() + chosen_shift})


# ---- contract matrix over the registry ----

@pytest.mark.parametrize("name", preference_loss_names())
def test_loss_is_finite_per_pair_and_differentiable(name):
    inputs = _inputs()
    out = get_preference_loss(name)(inputs)
    assert out.loss.shape == (B,) and torch.isfinite(out.loss).all()
    for stat in (out.chosen_rewards, out.rejected_rewards, out.margins, out.accuracies):
        assert stat.shape == (B,) and not stat.requires_grad
    assert set(out.stats_sum()) == {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"}
    grad_chosen, grad_rejected = torch.autograd.grad(out.loss.sum(), [inputs.policy_chosen_logps, inputs.policy_rejected_logps])
    assert torch.isfinite(grad_chosen).all() and (grad_chosen < 0).all()  # raising log π(y_w) lowers every pair's loss
    assert torch.isfinite(grad_rejected).all() and (grad_rejected > 0).all()


@pytest.mark.parametrize("name", preference_loss_names())
def test_loss_is_lower_when_the_chosen_is_more_likely(name):
    loss = get_preference_loss(name)
    base = _inputs()
    assert (loss(_shifted(base, 1.0)).loss < loss(_shifted(base, 0.0)).loss).all()
    decisive = loss(_shifted(base, 40.0))  # chosen far more likely than rejected: every pair won
    assert decisive.accuracies.eq(1).all() and (decisive.margins > 0).all()


@pytest.mark.parametrize("name", preference_loss_names())
def test_a_margin_makes_every_pair_harder_to_win(name):
    loss = get_preference_loss(name)
    base = _inputs()
    with_margin = PreferenceInputs(**{**base.__dict__, "margin": torch.full((B,), 0.3, dtype=torch.float64)})
    assert (loss(with_margin).loss > loss(base).loss).all()


@pytest.mark.parametrize("name", preference_loss_names())
def test_reference_free_losses_never_read_the_reference(name):
    loss = get_preference_loss(name)
    no_reference = _inputs(ref_chosen_logps=None, ref_rejected_logps=None)
    if loss.reference_free:
        moved = _inputs(ref_chosen_logps=torch.zeros(B, dtype=torch.float64), ref_rejected_logps=torch.ones(B, dtype=torch.float64))
        torch.testing.assert_close(loss(no_reference).loss, loss(moved).loss)
    else:
        with pytest.raises(ValueError, match="ref_chosen_logps"):
            loss(no_reference)


def test_registry_flags_and_lookup():
    assert {"sigmoid", "ipo", "hinge", "orpo", "simpo"} <= set(preference_loss_names())
    assert {n for n in preference_loss_names() if get_preference_loss(n).reference_free} >= {"orpo", "simpo"}
    assert not any(get_preference_loss(n).reference_free for n in ("sigmoid", "ipo", "hinge"))
    with pytest.raises(TunelabError, match="unknown preference loss 'dpo'.*sigmoid"):
        get_preference_loss("dpo")
    with pytest.raises(ValueError, match="registered twice"):
        register_preference_loss("sigmoid")(lambda inputs, options: None)


def test_bad_or_ignored_options_are_user_errors():
    with pytest.raises(TunelabError, match="beta=0.*positive"):
        PreferenceOptions(beta=0.0)
    with pytest.raises(TunelabError, match="label_smoothing=0.5"):
        PreferenceOptions(label_smoothing=0.5)
    with pytest.raises(TunelabError, match="'hinge' does not use label_smoothing"):
        get_preference_loss("hinge")(_inputs(), PreferenceOptions(label_smoothing=0.1))
    with pytest.raises(ValueError, match="chosen_tokens"):
        get_preference_loss("simpo")(_inputs(chosen_tokens=None))


def test_orpo_stays_finite_when_the_policy_is_certain():
    inputs = _inputs(policy_chosen_logps=torch.zeros(B, dtype=torch.float64, requires_grad=True))
    out = get_preference_loss("orpo")(inputs)
    assert torch.isfinite(out.loss).all()
    assert torch.isfinite(torch.autograd.grad(out.loss.sum(), inputs.policy_chosen_logps)[0]).all()


# ---- ORPO and SimPO against their papers' formulas, written out independently ----

@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_matches_its_formula(lam):
    inputs = _inputs(seed=1)
    out = get_preference_loss("orpo")(inputs, PreferenceOptions(lambda_=lam))
    for i in range(B):
        p_w = math.exp(inputs.policy_chosen_logps[i].item() / inputs.chosen_tokens[i].item())  # per-token likelihood
        p_l = math.exp(inputs.policy_rejected_logps[i].item() / inputs.rejected_tokens[i].item())
        odds_ratio = (p_w / (1 - p_w)) / (p_l / (1 - p_l))
        expected = inputs.chosen_nll[i].item() - lam * math.log(odds_ratio / (1 + odds_ratio))  # log σ(log OR)
        assert out.loss[i].item() == pytest.approx(expected, abs=1e-9)
        assert out.chosen_rewards[i].item() == pytest.approx(math.log(p_w), abs=1e-12)


@pytest.mark.parametrize(("beta", "gamma"), [(2.0, 0.5), (2.5, 1.25)])
def test_simpo_matches_its_formula(beta, gamma):
    inputs = _inputs(seed=2)
    out = get_preference_loss("simpo")(inputs, PreferenceOptions(beta=beta, gamma=gamma))
    for i in range(B):
        reward_w = beta / inputs.chosen_tokens[i].item() * inputs.policy_chosen_logps[i].item()
        reward_l = beta / inputs.rejected_tokens[i].item() * inputs.policy_rejected_logps[i].item()
        expected = math.log(1 + math.exp(-(reward_w - reward_l - gamma)))  # -log σ(x) = log(1 + e^{-x})
        assert out.loss[i].item() == pytest.approx(expected, abs=1e-9)
        assert out.margins[i].item() == pytest.approx(reward_w - reward_l, abs=1e-12)


# ---- TRL as the oracle ----

def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)


def _bare(trainer_class, **attributes):
    """A TRL trainer without its ``__init__``: only the attributes its loss computation reads."""
    trainer = object.__new__(trainer_class)
    defaults = dict(accelerator=_accelerator(), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                    _total_train_tokens=0, _tp_size=1)
    for key, value in {**defaults, **attributes}.items():
        object.__setattr__(trainer, key, value)
    return trainer


def _trl_dpo(loss_type: str, inputs: PreferenceInputs, beta: float, label_smoothing: float = 0.0):
    """TRL's DPOTrainer loss (the batch mean) and its logged metrics on our fixed log-probabilities."""
    from trl.trainer.dpo_trainer import DPOTrainer

    lengths = torch.cat([inputs.chosen_tokens, inputs.rejected_tokens])  # (2B,): TRL's batch is [chosen; rejected]
    seq = int(lengths.max()) + 2  # a prompt token before every completion
    completion_mask = (torch.arange(seq) >= seq - lengths[:, None]).long()  # (2B, T)
    logps = torch.cat([inputs.policy_chosen_logps, inputs.policy_rejected_logps])  # (2B,)
    per_token = logps[:, None] * completion_mask[:, 1:] / lengths[:, None]  # (2B, T-1), sums back to logps

    def model(**kwargs):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    model.training = True
    trainer = _bare(DPOTrainer, model=model, loss_types=[loss_type], loss_weights=[1.0], beta=beta,
                    label_smoothing=label_smoothing, f_divergence_type="reverse_kl", ld_alpha=None,
                    precompute_ref_logps=True, aux_loss_enabled=False, use_weighting=False, args=SimpleNamespace())
    batch = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
             "completion_mask": completion_mask, "ref_chosen_logps": inputs.ref_chosen_logps,
             "ref_rejected_logps": inputs.ref_rejected_logps}
    loss = trainer._compute_loss(model, batch, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _assert_matches_trl(ours, trl_loss, inputs):
    torch.testing.assert_close(ours.loss.mean(), trl_loss, **TOL)
    params = [inputs.policy_chosen_logps, inputs.policy_rejected_logps]
    for mine, theirs in zip(torch.autograd.grad(ours.loss.mean(), params), torch.autograd.grad(trl_loss, params)):
        torch.testing.assert_close(mine, theirs, **TOL)


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_family_matches_trl_dpo_trainer(loss_type, beta):
    pytest.importorskip("trl")
    inputs = _inputs(seed=3)
    ours = get_preference_loss(loss_type)(inputs, PreferenceOptions(beta=beta))
    trl_loss, metrics = _trl_dpo(loss_type, inputs, beta)
    _assert_matches_trl(ours, trl_loss, inputs)
    # The stats a reporter logs are TRL's too (it logs batch means).
    for ours_stat, key in [(ours.chosen_rewards, "rewards/chosen"), (ours.rejected_rewards, "rewards/rejected"),
                           (ours.margins, "rewards/margins"), (ours.accuracies, "rewards/accuracies")]:
        assert ours_stat.mean().item() == pytest.approx(metrics[key], abs=1e-6)
    for i in range(B):  # and per pair, one pair at a time (TRL returns only the batch mean)
        pair = PreferenceInputs(**{k: None if v is None else v[i:i + 1] for k, v in inputs.__dict__.items()})
        one = get_preference_loss(loss_type)(pair, PreferenceOptions(beta=beta)).loss
        torch.testing.assert_close(one[0], _trl_dpo(loss_type, pair, beta)[0], **TOL)


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_label_smoothed_sigmoid_matches_trl_conservative_dpo(label_smoothing):
    """TRL 1.16's ``sigmoid`` dropped label smoothing; its ``aot`` loss is cDPO after sorting the batch's log-ratios,
    and sorting one pair changes nothing, so on single pairs it is exactly the label-smoothed DPO loss."""
    pytest.importorskip("trl")
    inputs = _inputs(seed=4)
    for i in range(B):
        pair = PreferenceInputs(**{k: None if v is None else v[i:i + 1] for k, v in inputs.__dict__.items()})
        ours = get_preference_loss("sigmoid")(pair, PreferenceOptions(beta=0.2, label_smoothing=label_smoothing))
        trl_loss, _ = _trl_dpo("aot", pair, 0.2, label_smoothing)
        _assert_matches_trl(ours, trl_loss, pair)


def test_reward_pair_loss_matches_trl_reward_trainer():
    pytest.importorskip("trl")
    from trl.trainer.reward_trainer import RewardTrainer

    g = torch.Generator().manual_seed(5)
    r_chosen = torch.randn(B, generator=g, dtype=torch.float64, requires_grad=True)
    r_rejected = torch.randn(B, generator=g, dtype=torch.float64, requires_grad=True)
    margin = torch.rand(B, generator=g, dtype=torch.float64)

    def model(**kwargs):
        return SimpleNamespace(logits=torch.cat([r_chosen, r_rejected])[:, None])  # (2B, 1), batch [chosen; rejected]

    model.training = True
    trainer = _bare(RewardTrainer, model=model, args=SimpleNamespace(center_rewards_coefficient=None))
    for m in (None, margin):
        batch = {"attention_mask": torch.ones(2 * B, 4, dtype=torch.long), **({} if m is None else {"margin": m})}
        trl_loss = trainer.compute_loss(model, batch)
        ours = reward_pair_loss(r_chosen, r_rejected, m)
        torch.testing.assert_close(ours.loss.mean(), trl_loss, **TOL)
        for mine, theirs in zip(torch.autograd.grad(ours.loss.mean(), [r_chosen, r_rejected]),
                                torch.autograd.grad(trl_loss, [r_chosen, r_rejected])):
            torch.testing.assert_close(mine, theirs, **TOL)
        assert ours.accuracies.mean().item() == pytest.approx(trainer._metrics["train"]["accuracy"][-1])


def test_simpo_and_orpo_match_trl_experimental_trainers():
    """A second opinion for the reference-free losses: TRL's (experimental) CPO trainer's SimPO and ORPO trainer."""
    pytest.importorskip("trl")
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    inputs = _inputs(seed=6)
    avg_chosen = inputs.policy_chosen_logps / inputs.chosen_tokens  # both trainers take average log-probs
    avg_rejected = inputs.policy_rejected_logps / inputs.rejected_tokens

    simpo = _bare(cpo.CPOTrainer, alpha=0.0, loss_type="simpo", simpo_gamma=0.8, beta=2.0, label_smoothing=0.1)
    trl_losses, _, _ = simpo.cpo_loss(avg_chosen, avg_rejected)
    ours = get_preference_loss("simpo")(inputs, PreferenceOptions(beta=2.0, gamma=0.8, label_smoothing=0.1))
    torch.testing.assert_close(ours.loss, trl_losses, **TOL)

    trainer = _bare(orpo.ORPOTrainer, beta=0.25)  # TRL's ORPO calls λ "beta"; its loss is nll - mean(λ log σ(...))
    trl_ratio_terms, _, _, _, _ = trainer.odds_ratio_loss(avg_chosen, avg_rejected)
    ours = get_preference_loss("orpo")(inputs, PreferenceOptions(lambda_=0.25))
    torch.testing.assert_close(ours.loss, inputs.chosen_nll - trl_ratio_terms, **TOL)
