"""LoRA (Hu et al. 2021, arXiv:2106.09685) with rsLoRA, DoRA and PiSSA options, through peft.

Update rule: for each targeted weight W (d_out x d_in), W' = W + (alpha / r) * B @ A with A (r x d_in)
random and B (d_out x r) zero at start, so training starts from the base model. rsLoRA
(arXiv:2312.03732) scales by alpha / sqrt(r) instead; DoRA (arXiv:2402.09353) also learns a
per-column magnitude; PiSSA (arXiv:2404.02948) starts A and B from the top-r singular vectors of W
and trains them on the residual W - BA. The artifact is a PEFT adapter directory that
``peft.PeftModel.from_pretrained`` loads on the base model named in its ``adapter_config.json``
(for PiSSA it is converted on save into an equivalent rank-2r LoRA of the *original* weights).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tunelab.methods.base import register_method
from tunelab.methods.common import PeftMethod


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
    trainable_token_indices: list[int] | None = Field(
        None, description="embedding rows to train as well; set automatically for tokens the chat-template fallback adds"
    )


def lora_config(options: LoraOptions):
    from peft import LoraConfig

    return LoraConfig(
        r=options.r,
        lora_alpha=options.alpha if options.alpha is not None else 2 * options.r,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        use_rslora=options.use_rslora,
        use_dora=options.use_dora,
        init_lora_weights={"default": True}.get(options.init, options.init),
        bias=options.bias,
        trainable_token_indices=options.trainable_token_indices,
        task_type="CAUSAL_LM",
    )


@register_method
class LoRA(PeftMethod):
    name = "lora"
    options_class = LoraOptions
    mergeable = True
    default_lr = 1e-3

    def peft_config(self, model: nn.Module, options: LoraOptions):
        return lora_config(options)

    def apply(self, model: nn.Module, options: LoraOptions) -> nn.Module:
        model = super().apply(model, options)
        if options.init == "pissa":
            # PiSSA rewrites the base weights to the residual; keep the initial adapter so that save()
            # can convert the result into a LoRA of the original weights (loadable on the plain base).
            initial = tempfile.TemporaryDirectory(prefix="tunelab-pissa-")
            model.save_pretrained(initial.name, safe_serialization=True)
            model._tunelab_pissa_initial = initial  # removed with the model
        return model

    def save(self, model: nn.Module, directory: Path) -> None:
        initial = getattr(model, "_tunelab_pissa_initial", None)
        if initial is None:
            return super().save(model, directory)
        model.save_pretrained(directory, safe_serialization=True, path_initial_model_for_weight_conversion=initial.name)
