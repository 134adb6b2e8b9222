"""The options of every tuning method (the ``method:`` section of a config), apart from the methods themselves.

Light on purpose: pydantic and the standard library only. Loading a config validates its ``method:``
section with these classes (``tunelab.resolve``), and a config is loaded by commands that never train
(``tunelab plan``, the dashboard, ``tunelab compare``); keeping the classes here, rather than beside the
implementations that import torch and peft, keeps those commands fast. Each method declares its class in
``tunelab.methods`` (``declare_method``); its implementation module imports it from here.

A check that needs only the options (a regular expression that does not compile, targets that are not a
subset) belongs here, so ``load_config`` reports it with the config's line rather than the method minutes
into a run.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["DEFAULT_INIT_TEXT", "AdapterOptions", "FreezeOptions", "FullOptions", "IA3Options", "LoraOptions",
           "PrefixOptions", "PromptOptions", "QLoraOptions", "vision_training"]

# What of a vision-language model's image side trains besides the language model (``method.train_vision``).
TrainVision = Literal["none", "projector", "tower"]


def _train_vision_field(how: str):
    """The ``train_vision`` option of a method that can train a VLM's image side; ``how`` says how it trains it."""
    return Field("none", description="on a vision-language model, also train the multi-modal projector (projector) or "
                 f"the projector and the vision tower (tower), {how}; none: the language model only. Refused on a "
                 "text-only model")


def vision_training(options: BaseModel) -> str:
    """``train_vision`` of a method's options: ``none`` for a method that has no such option (it trains the
    language model only)."""
    return options.train_vision if "train_vision" in type(options).model_fields else "none"  # type: ignore[attr-defined]


class _LanguageModelOnly(BaseModel):
    """A method that can only train the language model of a VLM: ``train_vision`` other than none is refused at
    load, with the methods that can."""

    @model_validator(mode="before")
    @classmethod
    def _no_vision_training(cls, data):
        if not isinstance(data, dict) or "train_vision" not in data:
            return data
        if data["train_vision"] not in ("none", None):
            method = data.get("name", cls.__name__.removesuffix("Section").removesuffix("Options").lower())
            raise ValueError(f"method.train_vision={data['train_vision']}: method {method} trains the language model "
                             "only (it cannot train a vision tower or projector); use method lora, qlora, full or freeze, "
                             "or leave method.train_vision out")
        return {key: value for key, value in data.items() if key != "train_vision"}


class FullOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train_vision: TrainVision = _train_vision_field("all their weights")


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, gt=0, description="rank of the update")
    alpha: float | None = Field(None, gt=0, description="scale numerator; default 2*r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input (peft's default 0: on the demo "
                           "0.05 gave the same accuracy over two seeds at ~25% more step time and ~1 GB more memory)")
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or module names like [q_proj, v_proj]")
    use_rslora: bool = False
    use_dora: bool = False
    init: Literal["default", "gaussian", "pissa"] = Field("default", description="initialisation of A and B; pissa = principal singular vectors")
    bias: Literal["none", "all", "lora_only"] = "none"
    experts: bool | None = Field(
        None, description="on a mixture-of-experts model, also train the fused expert weights (peft's target_parameters); "
                          "default true on MoE models; routers stay frozen either way")
    trainable_token_indices: list[int] | None = Field(
        None, description="embedding rows to train as well; set automatically for tokens the chat-template fallback adds"
    )
    train_vision: TrainVision = _train_vision_field("with adapters on their linear layers")

    # Checked here so that load_config reports them with the config line, not peft minutes into a run.
    @field_validator("target_modules")
    @classmethod
    def _targets_are_names_or_regex(cls, targets: str | list[str]) -> str | list[str]:
        if isinstance(targets, list):
            if not targets or any(not t.strip() for t in targets):
                raise ValueError("give at least one module name, none of them empty (e.g. [q_proj, v_proj]), "
                                 "or 'all-linear'")
        elif targets != "all-linear":  # peft matches a single string as a regex against full module names
            try:
                re.compile(targets)
            except re.error as exc:
                raise ValueError(f"{targets!r} is not 'all-linear' and not a valid regular expression ({exc}); "
                                 "give a list of module names like [q_proj, v_proj]") from None
        return targets

    @field_validator("trainable_token_indices")
    @classmethod
    def _token_indices_are_rows(cls, indices: list[int] | None) -> list[int] | None:
        negative = [i for i in indices or [] if i < 0]
        if negative:
            raise ValueError(f"embedding rows are numbered from 0; {negative} are negative")
        return indices


class QLoraOptions(LoraOptions):
    bits: Literal[4, 8] = Field(4, description="base weight precision")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type")
    double_quant: bool = Field(True, description="also quantize the quantization constants (4-bit only)")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype the 4-bit weights are dequantized to; auto = bfloat16 on GPUs that have it, else float32"
    )


class IA3Options(_LanguageModelOnly):
    model_config = ConfigDict(extra="forbid")

    target_modules: list[str] | None = Field(None, description="default: found in the model (key, value and feed-forward down projections)")
    feedforward_modules: list[str] | None = Field(None, description="targets scaled on their input rather than output; default as peft")

    # Checked here so that load_config reports them with the config line, not peft minutes into a run.
    @field_validator("target_modules", "feedforward_modules")
    @classmethod
    def _names_given(cls, names: list[str] | None) -> list[str] | None:
        if names is not None and (not names or any(not n.strip() for n in names)):
            raise ValueError("give at least one module name, none of them empty, or leave it out for peft's default")
        return names

    @model_validator(mode="after")
    def _feedforward_among_targets(self):
        if self.target_modules and self.feedforward_modules:
            outside = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if outside:
                raise ValueError(f"method.feedforward_modules {outside} are not in method.target_modules "
                                 f"{self.target_modules}; feed-forward modules must be a subset of the targets")
        return self


class FreezeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    last_n_blocks: int = Field(2, ge=0, description="train the last N transformer blocks")
    modules: list[str] = Field(default_factory=list, description="also train parameters whose name matches any of these regexes, e.g. ['norm.weight$']")
    train_vision: TrainVision = _train_vision_field("all their weights")

    # Checked here so that load_config reports them with the config line, not apply() minutes into a run.
    @field_validator("modules")
    @classmethod
    def _modules_are_regexes(cls, modules: list[str]) -> list[str]:
        for pattern in modules:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression ({exc}); "
                                 r"escape special characters, e.g. 'lm_head\.weight$'") from None
        return modules

    @model_validator(mode="after")
    def _trains_something(self):
        if self.last_n_blocks == 0 and not self.modules:
            raise ValueError("nothing to train: method.last_n_blocks is 0 and method.modules is empty; "
                             "set last_n_blocks > 0 or name parameters in modules")
        return self


class AdapterOptions(_LanguageModelOnly):
    model_config = ConfigDict(extra="forbid")

    bottleneck: int = Field(64, gt=0, description="adapter width m (d -> m -> d)")
    nonlinearity: Literal["gelu", "relu", "silu", "tanh"] = "gelu"
    init_scale: float = Field(1e-3, gt=0, description="std of the normal init of the down-projection; up starts at zero")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="linear layers to put an adapter after, by name or dotted suffix (e.g. [o_proj, down_proj]); "
        "None = the last linear layer of every attention and MLP sublayer",
    )

    @field_validator("target_modules")
    @classmethod
    def _no_empty_names(cls, names: list[str] | None) -> list[str] | None:
        # an empty name matches no module; said here rather than by apply(), after the untuned evaluation
        if names is not None and any(not n.strip() for n in names):
            raise ValueError(f"module names must not be empty (got {names}); e.g. [o_proj, down_proj]")
        return names


DEFAULT_INIT_TEXT = "You are a careful assistant. Read the request and answer exactly what it asks."


class PromptOptions(_LanguageModelOnly):
    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(20, gt=0, description="length of the soft prompt")
    init: Literal["text", "vocab", "random"] = Field(
        "text", description="start from init_text's embeddings, from random vocabulary embeddings, or from N(0, 1)")
    init_text: str = Field(DEFAULT_INIT_TEXT, min_length=1, description="text for init: text (repeated or cut to the length)")

class PrefixOptions(_LanguageModelOnly):
    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(20, gt=0, description="prefix length per layer")
    projection: bool = Field(False, description="produce the prefix through a 2-layer MLP (reparameterisation)")
    projection_hidden: int = Field(512, gt=0, description="hidden size of that MLP")
    init: Literal["text", "random"] | None = Field(
        None, description="text: the base model's keys/values for init_text; random: peft's N(0, 1); "
                          "default text, or random with projection")
    init_text: str = Field(DEFAULT_INIT_TEXT, min_length=1, description="text for init: text (repeated or cut to the length)")

    @model_validator(mode="after")
    def _init_fits_projection(self):
        if self.init == "text" and self.projection:
            raise ValueError("init: text sets the prefix keys/values directly, which projection: true replaces "
                             "with an MLP's output; use init: random with projection, or projection: false")
        return self

    @property
    def from_text(self) -> bool:
        return (self.init or ("random" if self.projection else "text")) == "text"
