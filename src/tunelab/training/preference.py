"""Preference losses (DPO/cDPO, IPO, hinge/SLiC, ORPO, SimPO) and the reward-model pair loss, on plain tensors.

Hand-written rather than taken from TRL: TRL computes these inline in its trainers' forward passes
(``DPOTrainer._compute_loss`` needs the model outputs, an accelerator and the trainer's state), so they
cannot be called on the log-probabilities of our own loop. Each is a few lines; TRL's trainers are the
test oracle (``tests/unit/test_preference_losses.py``).

Inputs are per pair (batch ``B``, shape ``(B,)``): the log-probabilities of the chosen and rejected
completions *summed* over their tokens, under the policy and (for reference-based losses) under the
frozen reference; the completions' token counts where a loss normalises by length; ORPO also takes the
chosen completion's SFT loss. The optional per-pair ``margin`` is in reward units for every loss: it is
subtracted from the quantity the loss pushes up (the reward difference), so a pair must be won by at
least ``margin`` (as ODPO, Amini et al. 2024, and Llama 2's reward model, Touvron et al. 2023).

Losses are declared by name, with what each needs, in ``tunelab.training.preference_options`` (no torch, so a
config's loss is checked when it loads) and register their functions here (``@register_preference_loss``);
a recipe looks one up with :func:`get_preference_loss`, reads ``reference_free`` to know
whether to run a reference model, and calls it. The result holds the per-pair loss and the stats a step reporter logs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from tunelab.errors import TunelabError
from tunelab.training.preference_options import PREFERENCE_LOSSES, PreferenceOptions, preference_loss_names

__all__ = ["PREFERENCE_LOSSES", "PreferenceInputs", "PreferenceLoss", "PreferenceLossSpec", "PreferenceOptions",
           "get_preference_loss", "preference_loss_names", "reward_pair_loss"]


@dataclass(frozen=True)
class PreferenceInputs:
    """Per-pair tensors, each ``(B,)``; summed log-probabilities are over the completion tokens only."""

    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    chosen_tokens: torch.Tensor | None = None  # completion token counts (IPO, ORPO, SimPO)
    rejected_tokens: torch.Tensor | None = None
    chosen_nll: torch.Tensor | None = None  # ORPO's SFT term: (B,) per pair, or () already reduced over the batch
    margin: torch.Tensor | None = None  # reward units; None means 0


@dataclass(frozen=True)
class PreferenceLoss:
    """A preference loss per pair and the stats a recipe logs; every field is ``(B,)``, stats detached.

    Attributes:
        loss: Per-pair loss; a recipe sums (or averages) it and backpropagates.
        chosen_rewards: The loss's implicit reward of the chosen completion.
        rejected_rewards: The same for the rejected completion.
        margins: ``chosen_rewards - rejected_rewards``.
        accuracies: 1.0 where ``chosen_rewards > rejected_rewards``, else 0.0.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracies: torch.Tensor

    def stats_sum(self) -> dict[str, torch.Tensor]:
        """Stats summed over the pairs, as device tensors (the step reporter divides by the pair count)."""
        return {"rewards/chosen": self.chosen_rewards.sum(), "rewards/rejected": self.rejected_rewards.sum(),
                "rewards/margin": self.margins.sum(), "rewards/accuracy": self.accuracies.sum()}


def _result(loss: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> PreferenceLoss:
    chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
    return PreferenceLoss(loss=loss, chosen_rewards=chosen, rejected_rewards=rejected, margins=chosen - rejected,
                          accuracies=(chosen > rejected).to(chosen.dtype))


LossFn = Callable[[PreferenceInputs, PreferenceOptions], PreferenceLoss]


@dataclass(frozen=True)
class PreferenceLossSpec:
    """A registered preference loss and what it needs from the recipe.

    Attributes:
        name: Registry name (the config's loss type).
        fn: The loss on already-checked inputs.
        reference_free: True where the loss never reads the reference: the recipe skips the reference model.
        needs_lengths: True where ``chosen_tokens`` and ``rejected_tokens`` are required.
        needs_chosen_nll: True where ``chosen_nll`` is required (ORPO).
        options: The :class:`PreferenceOptions` fields the loss reads.
    """

    name: str
    fn: LossFn
    reference_free: bool
    needs_lengths: bool
    needs_chosen_nll: bool
    options: frozenset[str]

    def __call__(self, inputs: PreferenceInputs, options: PreferenceOptions | None = None) -> PreferenceLoss:
        """The loss on ``inputs``; TunelabError for an option this loss would ignore, ValueError for missing inputs."""
        options = options or PreferenceOptions()
        ignored = [f.name for f in fields(options) if f.name not in self.options and getattr(options, f.name) != f.default]
        if ignored:
            raise TunelabError(f"preference loss {self.name!r} does not use {', '.join(ignored)}: remove it, or pick a "
                               f"loss that does (it reads {', '.join(sorted(self.options))})")
        self._check(inputs)
        return self.fn(inputs, options)

    def _check(self, inputs: PreferenceInputs) -> None:
        # Missing tensors are a recipe's bug, not the user's: ValueError, naming the field.
        required = ["policy_chosen_logps", "policy_rejected_logps"]
        required += [] if self.reference_free else ["ref_chosen_logps", "ref_rejected_logps"]
        required += ["chosen_tokens", "rejected_tokens"] if self.needs_lengths else []
        required += ["chosen_nll"] if self.needs_chosen_nll else []
        shape = inputs.policy_chosen_logps.shape
        if len(shape) != 1:
            raise ValueError(f"preference loss {self.name!r}: policy_chosen_logps must be (B,), got {tuple(shape)}")
        for name in required:
            value = getattr(inputs, name)
            if value is None:
                raise ValueError(f"preference loss {self.name!r} needs PreferenceInputs.{name}")
            if value.shape != shape and not (name == "chosen_nll" and value.dim() == 0):
                raise ValueError(f"preference loss {self.name!r}: {name} has shape {tuple(value.shape)}, expected {tuple(shape)}")


def register_preference_loss(name: str, *, reference_free: bool = False, needs_lengths: bool = False,
                             needs_chosen_nll: bool = False, options: tuple[str, ...] = ("beta",)) -> Callable[[LossFn], LossFn]:
    """Decorator: register a loss function ``(inputs, options) -> PreferenceLoss`` under ``name``, with what it needs:
    a declared loss's declaration, else these arguments (a loss registered from outside tunelab)."""
    def decorate(fn: LossFn) -> LossFn:
        needs = PREFERENCE_LOSSES.capabilities(name) if name in PREFERENCE_LOSSES else {
            "reference_free": reference_free, "needs_lengths": needs_lengths, "needs_chosen_nll": needs_chosen_nll,
            "options": frozenset(options)}
        PREFERENCE_LOSSES.register(name, PreferenceLossSpec(name, fn, **needs), **needs)
        return fn
    return decorate


def get_preference_loss(name: str) -> PreferenceLossSpec:
    """The registered preference loss called ``name``; TunelabError naming the close matches and the choices."""
    spec = PREFERENCE_LOSSES.find(name)
    if spec is None:
        raise TunelabError(PREFERENCE_LOSSES.unknown(name))
    return spec


def _margin(inputs: PreferenceInputs, like: torch.Tensor) -> torch.Tensor | float:
    return 0.0 if inputs.margin is None else inputs.margin.to(like.dtype)


def _smoothed_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1-ε) log σ(z) - ε log σ(-z): the logistic loss when each label is wrong with probability ε."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _dpo_rewards(inputs: PreferenceInputs, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """β (log π(y|x) - log π_ref(y|x)) of the chosen and rejected completions (summed log-probabilities)."""
    return (beta * (inputs.policy_chosen_logps - inputs.ref_chosen_logps),
            beta * (inputs.policy_rejected_logps - inputs.ref_rejected_logps))


def _per_token(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    # Empty completions count as one token, as TRL does, so the mean stays finite.
    return logps / tokens.to(logps.dtype).clamp(min=1.0)


@register_preference_loss("sigmoid")
def sigmoid_loss(inputs: PreferenceInputs, options: PreferenceOptions) -> PreferenceLoss:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization"), with cDPO's label smoothing.

    ``r = β (log π(y|x) - log π_ref(y|x))``, ``z = r_w - r_l - margin``,
    ``loss = -(1-ε) log σ(z) - ε log σ(-z)`` (ε = ``label_smoothing``; conservative DPO, Mitchell 2023;
    ε = 0 is DPO's Eq. 7).
    """
    chosen, rejected = _dpo_rewards(inputs, options.beta)
    z = chosen - rejected - _margin(inputs, chosen)
    return _result(_smoothed_logistic(z, options.label_smoothing), chosen, rejected)


@register_preference_loss("ipo")
def ipo_loss(inputs: PreferenceInputs, options: PreferenceOptions) -> PreferenceLoss:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences").

    ``h = (log π(y_w) - log π_ref(y_w)) / |y_w| - (log π(y_l) - log π_ref(y_l)) / |y_l|``,
    ``loss = (h - (1/2 + margin) / β)²`` (Eq. 17 with τ = β; margin = 0 gives its ``(h - 1/(2τ))²``).

    The log-ratios are averaged per token, as TRL does (its comment: confirmed with the IPO authors, and
    what the paper's results used): summed log-ratios would make the squared loss grow with length.
    Rewards (stats) are the summed ``β`` log-ratios, as for DPO.
    """
    chosen, rejected = _dpo_rewards(inputs, options.beta)
    h = (_per_token(inputs.policy_chosen_logps - inputs.ref_chosen_logps, inputs.chosen_tokens)
         - _per_token(inputs.policy_rejected_logps - inputs.ref_rejected_logps, inputs.rejected_tokens))
    target = (0.5 + _margin(inputs, h)) / options.beta
    return _result((h - target) ** 2, chosen, rejected)


@register_preference_loss("hinge")
def hinge_loss(inputs: PreferenceInputs, options: PreferenceOptions) -> PreferenceLoss:
    """Hinge loss of SLiC (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback").

    SLiC's calibration loss ``max(0, δ - log π(y_w) + log π(y_l))`` on reference-normalised log-probs with
    δ = 1/β, scaled by β (as RSO, Liu et al. 2023, and TRL): ``loss = max(0, 1 - (r_w - r_l - margin))``,
    ``r = β (log π(y|x) - log π_ref(y|x))``.
    """
    chosen, rejected = _dpo_rewards(inputs, options.beta)
    return _result(torch.relu(1 - (chosen - rejected - _margin(inputs, chosen))), chosen, rejected)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (log1p branch below -ln 2, expm1 above)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


# An average log-prob of exactly 0 (every token certain) has infinite odds; clamping just below it keeps
# the log odds finite (such a pair's gradient through the odds ratio is ~0 anyway).
_MAX_AVG_LOGP = -1e-6


@register_preference_loss("orpo")
def orpo_loss(inputs: PreferenceInputs, options: PreferenceOptions) -> PreferenceLoss:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"). Reference-free.

    With average per-token log-probs ``a = log π(y|x) / |y|`` and ``log odds(y) = a - log(1 - exp(a))``:
    ``loss = chosen_nll - λ log σ(log odds(y_w) - log odds(y_l) - margin)`` (Eq. 6–7). ``chosen_nll``
    is the SFT loss of the chosen completion, given by the recipe (per pair, or already reduced).
    Rewards (stats) are the average log-probs ``a``.
    """
    chosen = _per_token(inputs.policy_chosen_logps, inputs.chosen_tokens).clamp(max=_MAX_AVG_LOGP)
    rejected = _per_token(inputs.policy_rejected_logps, inputs.rejected_tokens).clamp(max=_MAX_AVG_LOGP)
    log_odds_ratio = (chosen - _log1mexp(chosen)) - (rejected - _log1mexp(rejected))
    odds_ratio_loss = -F.logsigmoid(log_odds_ratio - _margin(inputs, chosen))
    nll = inputs.chosen_nll.to(chosen.dtype).expand_as(chosen)
    return _result(nll + options.lambda_ * odds_ratio_loss, chosen, rejected)


@register_preference_loss("simpo")
def simpo_loss(inputs: PreferenceInputs, options: PreferenceOptions) -> PreferenceLoss:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"). Reference-free.

    ``r = β/|y| log π(y|x)``, ``loss = -log σ(r_w - r_l - γ - margin)`` (Eq. 6); with label smoothing ε the
    logistic loss is smoothed as in cDPO (as TRL's CPO trainer does for SimPO).
    """
    chosen = options.beta * _per_token(inputs.policy_chosen_logps, inputs.chosen_tokens)
    rejected = options.beta * _per_token(inputs.policy_rejected_logps, inputs.rejected_tokens)
    z = chosen - rejected - options.gamma - _margin(inputs, chosen)
    return _result(_smoothed_logistic(z, options.label_smoothing), chosen, rejected)


def reward_pair_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None) -> PreferenceLoss:
    """Bradley–Terry pairwise loss of a reward model (Ouyang et al. 2022, InstructGPT; margin as in Llama 2).

    ``loss = -log σ(r_w - r_l - margin)`` per pair; rewards (stats) are the model's scores.

    Args:
        r_chosen: (B,) scalar rewards of the chosen completions.
        r_rejected: (B,) scalar rewards of the rejected completions.
        margin: (B,) how much better the chosen is rated (e.g. from a Likert gap); None means 0.
    """
    if r_chosen.shape != r_rejected.shape or r_chosen.dim() != 1:
        raise ValueError(f"reward_pair_loss needs two (B,) tensors, got {tuple(r_chosen.shape)} and {tuple(r_rejected.shape)}")
    offset = 0.0 if margin is None else margin.to(r_chosen.dtype)
    return _result(-F.logsigmoid(r_chosen - r_rejected - offset), r_chosen, r_rejected)
