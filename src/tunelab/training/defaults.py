"""Hyper-parameters chosen from the data when the config leaves them unset: the rule, as a pure function.

A user with a few hundred examples runs the defaults, so the defaults must fit a few hundred examples as well as
a hundred thousand. One fixed epoch at one fixed rate cannot: 300 examples at batch 8 are 38 optimizer steps,
too few for LoRA at a rate low enough not to overwrite the model's general behaviour (bench/NOTES.md, session 9:
lr 2e-4 for one epoch learned half of what 1e-3 did on two of three tasks; 1e-3 forgot up to 89 % of the
probe). The rule, measured on SmolLM2-135M-Instruct (README, "Defaults chosen from the data"):

- **epochs**: enough passes over the data for ``TARGET_STEPS`` optimizer steps, at least 1, at most
  ``MAX_EPOCHS``; with a validation slice the best validated step is kept and training stops early when the
  validation loss stops falling, so the epoch count is an upper bound, not a guess that must be right.
- **learning rate**: the method's recommended rate (``tunelab methods``: LoRA's about ten times full
  fine-tuning's, as Schulman et al. 2025, "LoRA Without Regret", found and our runs confirm) scaled by
  ``sqrt(REFERENCE_WIDTH / hidden size)`` for a wider model, the usual width scaling of the rate (measured here
  only at width 576; a narrower model keeps the method's rate).
- **warmup**: ``WARMUP_STEPS`` steps, as a ratio of the run (at most 10 %).
- **batch**: 8 examples, 4 below ``SMALL_DATA`` examples (a handful of steps per epoch learns little; LoRA
  also trains worse at large batches).
- **rank**: 16 (alpha 2r) up to ``RANK_16_TOKENS`` trained tokens, then 32, then 64 past ten times that:
  at a few hundred examples capacity is not what limits LoRA (Biderman et al. 2024; Schulman et al. 2025).
- **replay**: ``REPLAY_RATIO`` of every epoch from the untuned model's own answers to general instructions
  (``data.replay: {path: self}``), from ``SMALL_DATA`` to ``REPLAY_UP_TO`` task examples (fewer train fewer
  steps): a few hundred examples of one format otherwise teach that format to every prompt (a JSON object, one
  label word, as answer to "What is the capital of Japan?"). ``REPLAY_KL`` of the replayed answers' loss (all
  of it) is the KL from the untuned model's next-token distributions (``data.replay.kl``) where the method and
  model allow it: matching whole distributions holds the general behaviour better than its greedy answers
  (the held-out tool calls lost 2 probe items at kl 0.5, 1 at kl 1.0, the score unchanged; session 12).
- **learning rate with the KL replay**: a rank-``r`` method's rate times ``KL_RATE_FACTOR``: LoRA at its own
  rate learned 13 points less than full fine-tuning on the held-out tool-call task; at 2.5 times it matched
  full, and the KL kept what the higher rate would otherwise overwrite (bench/NOTES.md, session 11).
- **validation**: ``VALIDATION_SHARE`` of the train examples (between ``VALIDATION_MIN`` and ``VALIDATION_MAX``)
  held out from ``SMALL_DATA`` examples up, validated twice an epoch, the best step kept, training stopped
  after ``PATIENCE`` validations without a lower loss.

No library chooses hyper-parameters from the data this way (TRL, Axolotl and LLaMA-Factory ship fixed
defaults), hence this module. ``tunelab.stages.defaults`` reads the facts and applies the choices to a config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

TARGET_STEPS = 100
MAX_EPOCHS = 3
REFERENCE_WIDTH = 576  # SmolLM2-135M's hidden size: where the rates were measured
WARMUP_STEPS = 10
SMALL_DATA = 100
RANK_16_TOKENS = 1_000_000
VALIDATION_SHARE, VALIDATION_MIN, VALIDATION_MAX = 0.08, 16, 200
PATIENCE = 2
REPLAY_RATIO, REPLAY_UP_TO = 0.2, 10_000
REPLAY_KL, KL_RATE_FACTOR = 1.0, 2.5
# The keys the rule may choose; a key the config sets is left as set.
KEYS = ("train.epochs", "train.lr", "train.warmup_ratio", "train.batch_size", "method.r", "data.replay",
        "data.validation", "train.eval_every", "train.keep_best", "train.early_stopping")


@dataclass(frozen=True)
class DataFacts:
    """What the rule looks at: the train examples, the tokens they train, the model's width and the method."""

    examples: int
    trained_tokens: int
    hidden_size: int | None
    method_lr: float  # the method's recommended rate at the reference width
    has_rank: bool = False  # the method's options have a rank ``r``
    batch_size: int = 8  # the config's values, used where the rule does not choose them
    grad_accum: int = 1
    epochs: float = 1
    max_steps: int | None = None  # a step budget the config sets (then epochs are not chosen)
    replay_ratio: float | None = None  # the config's data.replay share
    replay_kl: float = 0.0  # the config's data.replay.kl
    kl_supported: bool = True  # the method and model give their own logits at every position (data.replay.kl works)


@dataclass(frozen=True)
class Choice:
    key: str
    value: Any
    why: str


def choose(facts: DataFacts, unset: set[str] | frozenset[str]) -> list[Choice]:
    """The values for the ``unset`` keys (of ``KEYS``), each with the reason printed at the start of a run."""
    chosen: dict[str, Choice] = {}

    def pick(key: str, value: Any, why: str) -> None:
        if key in unset:
            chosen[key] = Choice(key, value, why)

    validation = _validation_size(facts.examples)
    if "data.validation" not in unset:
        validation = 0  # the config's own slice (or none); the train count below is close enough either way
    train = facts.examples - validation
    if SMALL_DATA <= facts.examples <= REPLAY_UP_TO:
        pick("data.replay", *_replay(facts))
    replay = chosen["data.replay"].value if "data.replay" in chosen else {"ratio": facts.replay_ratio or 0, "kl": facts.replay_kl}
    ratio = replay["ratio"]
    batch = 4 if train < SMALL_DATA else 8
    pick("train.batch_size", batch, f"{train} train examples" + (f" (below {SMALL_DATA}: more, smaller steps)" if batch == 4 else ""))
    batch = chosen["train.batch_size"].value if "train.batch_size" in chosen else facts.batch_size
    steps_per_epoch = math.ceil(train / (1 - ratio) / (batch * facts.grad_accum))  # a replay adds to the epoch
    epochs = min(MAX_EPOCHS, max(1, math.ceil(TARGET_STEPS / steps_per_epoch)))
    if facts.max_steps is None:
        pick("train.epochs", epochs, f"{steps_per_epoch} steps an epoch; {epochs} epoch(s) reach ~{TARGET_STEPS} steps"
             + (f" (at most {MAX_EPOCHS})" if epochs == MAX_EPOCHS and steps_per_epoch * MAX_EPOCHS < TARGET_STEPS else ""))
    total = facts.max_steps or math.ceil(steps_per_epoch * (chosen["train.epochs"].value if "train.epochs" in chosen
                                                            else facts.epochs))
    pick("train.lr", *_rate(facts, with_kl=bool(replay.get("kl"))))
    pick("train.warmup_ratio", round(min(0.1, WARMUP_STEPS / max(total, 1)), 4), f"{WARMUP_STEPS} warmup steps of {total}")
    if facts.has_rank:
        pick("method.r", *_rank(facts.trained_tokens))
    if validation:
        pick("data.validation", validation, f"{VALIDATION_SHARE:.0%} of {facts.examples} examples held out to pick the best step")
        pick("train.eval_every", max(1, steps_per_epoch // 2), "validation twice an epoch")
        pick("train.keep_best", True, "the artifact is the step with the lowest validation loss")
        pick("train.early_stopping", PATIENCE, f"stop after {PATIENCE} validations without a lower loss")
    return [chosen[key] for key in KEYS if key in chosen]


def _validation_size(examples: int) -> int:
    if examples < SMALL_DATA:
        return 0
    return int(min(VALIDATION_MAX, max(VALIDATION_MIN, round(VALIDATION_SHARE * examples))))


def _replay(facts: DataFacts) -> tuple[dict, str]:
    why = f"{REPLAY_RATIO:.0%} of each epoch: the untuned model's own answers to general instructions"
    if not facts.kl_supported:
        return {"path": "self", "ratio": REPLAY_RATIO}, why + " (no KL: the method or model has no logits of its own at each position)"
    share = "their loss" if REPLAY_KL == 1 else f"{REPLAY_KL:.0%} of their loss"
    return {"path": "self", "ratio": REPLAY_RATIO, "kl": REPLAY_KL}, why + f", {share} the KL from its next-token distributions"


def _rate(facts: DataFacts, with_kl: bool) -> tuple[float, str]:
    method_lr, what = facts.method_lr, "the method's rate"
    if with_kl and facts.has_rank:  # the KL replay holds what a higher rate would overwrite
        method_lr = float(f"{facts.method_lr * KL_RATE_FACTOR:.2g}")
        what = f"the method's {facts.method_lr:g} x {KL_RATE_FACTOR:g}, as the KL replay holds the general behaviour"
    width = facts.hidden_size or REFERENCE_WIDTH
    if width <= REFERENCE_WIDTH:  # never above the measured rate: a narrower model gets the method's own
        return method_lr, what
    return float(f"{method_lr * math.sqrt(REFERENCE_WIDTH / width):.2g}"), f"{what}, x sqrt({REFERENCE_WIDTH}/{width}) for the model's width"


def _rank(trained_tokens: int) -> tuple[int, str]:
    if trained_tokens <= RANK_16_TOKENS:
        return 16, f"{trained_tokens:,} trained tokens, up to {RANK_16_TOKENS:,}: capacity is not the limit"
    if trained_tokens <= 10 * RANK_16_TOKENS:
        return 32, f"{trained_tokens:,} trained tokens, over {RANK_16_TOKENS:,}"
    return 64, f"{trained_tokens:,} trained tokens, over {10 * RANK_16_TOKENS:,}"


def describe(choices: list[Choice]) -> list[str]:
    """One line per choice, for the start of a run: ``train.epochs = 3: 35 steps an epoch; ...``."""
    def shown(value: Any) -> str:
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {shown(v)}" for k, v in value.items()) + "}"
        return f"{value:g}" if isinstance(value, float) else str(value)

    return [f"{c.key} = {shown(c.value)}: {c.why}" for c in choices]
