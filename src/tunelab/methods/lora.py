"""LoRA (Hu et al. 2021, arXiv:2106.09685) with rsLoRA and DoRA options, through peft.

Update rule: for each targeted weight W (d_out x d_in), W' = W + (alpha / r) * B @ A with A (r x d_in)
random and B (d_out x r) zero at start, so training starts from the base model. rsLoRA
(arXiv:2312.03732) scales by alpha / sqrt(r) instead; DoRA (arXiv:2402.09353) also learns a
per-column magnitude. The artifact is a PEFT adapter directory that ``peft.PeftModel.from_pretrained``
loads on the base model named in its ``adapter_config.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tunelab.methods.base import register_method


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, gt=0, description="rank of the update")
    alpha: float | None = Field(None, gt=0, description="scale numerator; default 2*r")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or module names like [q_proj, v_proj]")
    use_rslora: bool = False
    use_dora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    trainable_token_indices: list[int] | None = Field(
        None, description="embedding rows to train as well; set automatically for tokens the chat-template fallback adds"
    )


@register_method
class LoRA:
    name = "lora"
    options_class = LoraOptions
    artifact = "adapter"

    def apply(self, model: nn.Module, options: LoraOptions) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=options.r,
            lora_alpha=options.alpha if options.alpha is not None else 2 * options.r,
            lora_dropout=options.dropout,
            target_modules=options.target_modules,
            use_rslora=options.use_rslora,
            use_dora=options.use_dora,
            bias=options.bias,
            trainable_token_indices=options.trainable_token_indices,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)

    def load(self, base_model: nn.Module, directory: Path) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, directory)

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()
