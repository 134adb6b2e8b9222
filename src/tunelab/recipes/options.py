"""The options of every recipe (the ``recipe:`` section of a config), apart from the recipes themselves.

Light on purpose, as ``tunelab.methods.options``: loading a config validates its ``recipe:`` section with
these classes (``tunelab.resolve``) and must not import the recipes' stages, torch or transformers; each
recipe is declared with its class in ``tunelab.recipes`` and its module imports the class from here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunelab.errors import TunelabError
from tunelab.rewards.guard import DEFAULT_ENV_TIMEOUT, DEFAULT_TIMEOUT
from tunelab.training.preference_options import PreferenceOptions, options_read, preference_loss_names

__all__ = ["DistillOptions", "DpoOptions", "GrpoOptions", "PretrainOptions", "RewardOptions", "SftOptions"]


class SftOptions(BaseModel):
    """The SFT recipe has no options of its own: the data, method and train sections say everything."""

    model_config = ConfigDict(extra="forbid")


class PretrainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text_field: str = Field("text", min_length=1, description="column holding the text in JSONL/CSV/Parquet files")
    holdout: float = Field(0.1, ge=0, lt=1, description="share of blocks held out for perplexity when data.eval is not set")
    packing: bool = Field(True, description="pack blocks into rows without padding (off for methods that cannot pack)")


_LOSS_KNOBS = {"beta": "beta", "label_smoothing": "label_smoothing", "gamma": "gamma", "orpo_lambda": "lambda_"}  # DpoOptions field -> PreferenceOptions field


class DpoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loss: str = Field("sigmoid", description="preference loss: " + ", ".join(preference_loss_names()))
    beta: float = Field(0.1, gt=0, description="inverse temperature of the implicit reward (DPO, IPO, hinge, SimPO)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="probability a label is flipped (cDPO; sigmoid, simpo)")
    gamma: float = Field(0.5, description="SimPO's target reward margin")
    orpo_lambda: float = Field(0.1, ge=0, description="ORPO's weight of the odds-ratio term next to the SFT loss")
    reference: str = Field("start", description="start (the model training starts from), or a run directory or model")
    precompute_reference: bool = Field(False, description="compute the reference log-probabilities once and cache them "
                                       "(always done where the method cannot be switched off)")
    holdout: float = Field(0.1, ge=0, lt=1, description="share of train pairs held out when data.eval is not set")
    task_eval: str | None = Field(None, description="prompt → reference examples scored with eval.metric before and after")

    @model_validator(mode="after")
    def _knobs_the_loss_reads(self) -> DpoOptions:
        try:
            reads = options_read(self.loss)
        except TunelabError as exc:
            raise ValueError(str(exc)) from None
        unused = [key for key, field in _LOSS_KNOBS.items() if key in self.model_fields_set and field not in reads]
        if unused:
            raise ValueError(f"loss {self.loss} does not read {', '.join(unused)} (it reads "
                             f"{', '.join(k for k, f in _LOSS_KNOBS.items() if f in reads)})")
        return self

    def loss_options(self) -> PreferenceOptions:
        reads = options_read(self.loss)
        return PreferenceOptions(**{field: getattr(self, key) for key, field in _LOSS_KNOBS.items() if field in reads})


class RewardOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    holdout: float = Field(0.1, ge=0, lt=1, description="share of train pairs held out when data.eval is not set")


class DistillOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    teacher: str | None = Field(None, description="the teacher: a model spec or run directory with the student's vocabulary")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field("forward_kl", description="divergence at the trained positions")
    beta: float = Field(0.5, ge=0, le=1, description="generalized JSD's mixture weight (0 = forward KL, 1 = reverse KL)")
    temperature: float = Field(1.0, gt=0, description="softens both distributions (logits / temperature)")
    alpha: float = Field(0.0, ge=0, le=1, description="weight of the student's cross-entropy on the reference answers")


class GrpoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rewards: list[dict[str, Any]] = Field(default_factory=list, description="reward functions: [{fn: NAME or "
                                          "'package.module:function', weight: 1.0, ...options}]")
    num_generations: int = Field(4, ge=2, description="completions sampled per prompt (the group)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    max_completion_length: int = Field(64, gt=0, description="tokens sampled per completion at most")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="divide advantages by the group's or "
                                                             "the batch's reward std, or not (Dr. GRPO)")
    loss_type: Literal["dapo", "dr_grpo", "grpo"] = Field("dapo", description="how token losses are aggregated")
    epsilon: float = Field(0.2, gt=0, lt=1, description="clip range of the policy ratio: [1 - epsilon, 1 + epsilon_high]")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip (DAPO's clip-higher, e.g. 0.28); default epsilon")
    num_iterations: int = Field(1, ge=1, description="optimizer steps per batch of samples")
    beta: float = Field(0.0, ge=0, description="weight of the KL to the reference (the method switched off); 0 = none")
    generation_batch_size: int = Field(32, gt=0, description="rows per generate call")
    samples_every: int = Field(5, ge=0, description="write sample completions with rewards to samples.jsonl every N steps")
    reward_timeout: float = Field(DEFAULT_TIMEOUT, gt=0, description="seconds one call of a 'module:function' reward "
                                  "(a whole round of completions) may take before the run stops with an error")
    environment: str | None = Field(None, description="agentic GRPO: 'package.module:Class' of an environment whose tools the "
                                    "model calls over multi-turn episodes (tunelab.rewards.environment)")
    environment_options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the environment class")
    max_turns: int = Field(4, ge=1, description="model turns per episode at most (with recipe.environment)")
    environment_timeout: float = Field(DEFAULT_ENV_TIMEOUT, gt=0, description="seconds one call of the environment "
                                       "(reset, step, reward) may take before the run stops with an error")

    @model_validator(mode="after")
    def _environment_options_need_an_environment(self) -> GrpoOptions:
        if self.environment is not None and ":" not in self.environment:
            raise ValueError(f"environment {self.environment!r}: write it as 'package.module:Class' (e.g. "
                             "tunelab.rewards.tool_envs:ShopSql)")
        unused = [k for k in ("environment_options", "max_turns", "environment_timeout") if k in self.model_fields_set]
        if self.environment is None and unused:
            raise ValueError(f"{', '.join(unused)} only apply to agentic GRPO; set recipe.environment too, or remove them")
        return self
