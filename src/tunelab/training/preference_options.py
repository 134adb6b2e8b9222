"""What the preference losses are called and read, declared without torch.

The losses themselves (``tunelab.training.preference``) are tensor code; a DPO config's ``recipe:`` section
is checked when the config loads (the loss exists, and reads the knobs the config sets), and loading a
config imports no torch (``tunelab.resolve``). So each loss is declared here in :data:`PREFERENCE_LOSSES`,
with what it needs from the recipe, and ``tunelab.training.preference`` registers its function under the
declared name on the first lookup. Adding a loss: one ``_declare`` line here and one
``@register_preference_loss`` function there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tunelab.errors import TunelabError
from tunelab.registry import Registry

_MODULE = "tunelab.training.preference"  # where the declared losses are registered


@dataclass(frozen=True)
class PreferenceOptions:
    """Hyper-parameters of the preference losses; each loss reads only those it declares.

    Attributes:
        beta: Inverse temperature of the implicit reward (DPO, hinge, SimPO); IPO's regulariser τ.
        label_smoothing: Probability that a pair's label is flipped (cDPO); sigmoid and SimPO only.
        gamma: SimPO's target reward margin γ.
        lambda_: ORPO's weight λ of the odds-ratio term.
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5
    lambda_: float = 0.1

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.beta) and self.beta > 0):
            problems.append(f"beta={self.beta}: set it to a positive number (0.1 is usual for DPO, 2 to 10 for SimPO)")
        if not 0.0 <= self.label_smoothing < 0.5:
            problems.append(f"label_smoothing={self.label_smoothing}: set it in [0, 0.5) (0 = trust every label)")
        if not math.isfinite(self.gamma):
            problems.append(f"gamma={self.gamma}: set it to a finite number (SimPO's reward margin, e.g. 0.5)")
        if not (math.isfinite(self.lambda_) and self.lambda_ >= 0):
            problems.append(f"lambda_={self.lambda_}: set it to a number >= 0 (ORPO's odds-ratio weight, e.g. 0.1)")
        if problems:
            raise TunelabError("preference loss options: " + "; ".join(problems))


PREFERENCE_LOSSES = Registry("preference loss")


def _declare(name: str, *, reference_free: bool = False, needs_lengths: bool = False, needs_chosen_nll: bool = False,
             options: tuple[str, ...] = ("beta",)) -> None:
    """``reference_free``: never reads the reference; ``needs_lengths``: token counts; ``needs_chosen_nll``: the
    chosen side's SFT loss; ``options``: the :class:`PreferenceOptions` fields it reads."""
    PREFERENCE_LOSSES.declare(name, _MODULE, reference_free=reference_free, needs_lengths=needs_lengths,
                              needs_chosen_nll=needs_chosen_nll, options=frozenset(options))


_declare("sigmoid", options=("beta", "label_smoothing"))
_declare("ipo", needs_lengths=True)
_declare("hinge")
_declare("orpo", reference_free=True, needs_lengths=True, needs_chosen_nll=True, options=("lambda_",))
_declare("simpo", reference_free=True, needs_lengths=True, options=("beta", "gamma", "label_smoothing"))


def preference_loss_names() -> list[str]:
    """Names of the preference losses, sorted."""
    return PREFERENCE_LOSSES.names()


def options_read(name: str) -> frozenset[str]:
    """The :class:`PreferenceOptions` fields the loss ``name`` reads; TunelabError naming the close matches."""
    if name not in PREFERENCE_LOSSES:
        raise TunelabError(PREFERENCE_LOSSES.unknown(name))
    return PREFERENCE_LOSSES.capabilities(name)["options"]
