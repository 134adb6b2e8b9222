"""Full fine-tuning: every weight is trained; the artifact is a complete HF model directory."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tunelab.methods.base import register_method
from tunelab.methods.common import MethodDefaults
from tunelab.methods.footprint import Footprint, ShapeLike
from tunelab.methods.options import FullOptions


@register_method
class FullFineTuning(MethodDefaults):
    """Update rule: W <- W - lr * AdamW(dL/dW) for every parameter W."""

    name = "full"
    artifact = "model"
    mergeable = True  # nothing to fold: the weights are the model
    trains_embeddings = True  # embedding rows of tokens a chat-template fallback adds train with everything else

    def apply(self, model: nn.Module, options: FullOptions) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def footprint(self, options: FullOptions, shape: ShapeLike) -> Footprint:
        """Every base parameter trains; nothing is added."""
        return Footprint(frozen_base=False, trainable=set(shape.parameter_table()))

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)

    def load(self, base_model: nn.Module, directory: Path, trainable: bool = False) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(directory, dtype=base_model.dtype)

    def merge(self, model: nn.Module) -> nn.Module:
        return model
