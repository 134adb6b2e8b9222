"""Soft prompts: prompt tuning (Lester et al. 2021, arXiv:2104.08691) and prefix tuning (Li & Liang
2021, arXiv:2101.00190), through peft.

Prompt tuning learns ``num_virtual_tokens`` input embeddings placed before every sequence (random, or
initialised from the embeddings of a text). Prefix tuning learns key/value vectors for every layer,
prepended to each attention's keys and values, optionally produced by a two-layer MLP during training
(the reparameterisation the paper uses for stability). Neither touches the base weights, so neither
can be merged; both change the sequence the model sees, so several examples per row (packing) and
gradient checkpointing are refused before training.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tunelab.methods.base import register_method
from tunelab.methods.common import PeftMethod


class PromptOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(20, gt=0, description="length of the soft prompt")
    init_text: str | None = Field(None, description="initialise the soft prompt from this text's embeddings; default random")


class PrefixOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(20, gt=0, description="prefix length per layer")
    projection: bool = Field(False, description="produce the prefix through a 2-layer MLP (reparameterisation)")
    projection_hidden: int = Field(512, gt=0, description="hidden size of that MLP")


@register_method
class PromptTuning(PeftMethod):
    name = "prompt"
    default_lr = 3e-2
    options_class = PromptOptions
    incompatible = frozenset({"packing", "gradient_checkpointing"})

    def peft_config(self, model: nn.Module, options: PromptOptions):
        from peft import PromptTuningConfig, PromptTuningInit

        if options.init_text is None:
            return PromptTuningConfig(num_virtual_tokens=options.num_virtual_tokens, task_type="CAUSAL_LM")
        return PromptTuningConfig(
            num_virtual_tokens=options.num_virtual_tokens, task_type="CAUSAL_LM",
            prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=options.init_text,
            tokenizer_name_or_path=model.config._name_or_path,
        )


@register_method
class PrefixTuning(PeftMethod):
    name = "prefix"
    default_lr = 1e-2
    options_class = PrefixOptions
    incompatible = frozenset({"packing", "gradient_checkpointing"})

    def peft_config(self, model: nn.Module, options: PrefixOptions):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(num_virtual_tokens=options.num_virtual_tokens, prefix_projection=options.projection,
                                  encoder_hidden_size=options.projection_hidden, task_type="CAUSAL_LM")
