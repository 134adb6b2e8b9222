"""IA3 (Liu et al. 2022, arXiv:2205.05638), through peft.

Learns one scaling vector per targeted activation: keys and values of attention (l_k, l_v) and the
input of the MLP's down projection (l_ff), each initialised to ones so training starts from the base
model; h <- l ⊙ h. The fewest trainable parameters of the family; mergeable into the weights.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tunelab.methods.base import register_method
from tunelab.methods.common import PeftMethod


class IA3Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target_modules: list[str] | None = Field(None, description="default: peft's choice for the architecture (k, v and MLP down projection)")
    feedforward_modules: list[str] | None = Field(None, description="targets scaled on their input rather than output; default as peft")


@register_method
class IA3(PeftMethod):
    name = "ia3"
    options_class = IA3Options
    mergeable = True
    default_lr = 1e-2

    def peft_config(self, model: nn.Module, options: IA3Options):
        from peft import IA3Config

        return IA3Config(target_modules=options.target_modules, feedforward_modules=options.feedforward_modules, task_type="CAUSAL_LM")
