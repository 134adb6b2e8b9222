"""QLoRA (Dettmers et al. 2023, arXiv:2305.14314): LoRA over a base quantized with bitsandbytes.

The frozen base is stored in 4-bit NormalFloat (optionally with double quantisation of the scales) or
8-bit, and dequantized block by block in ``compute_dtype`` during the forward pass; the LoRA matrices stay
in full precision and are the only trained weights. The artifact is an ordinary PEFT LoRA adapter.
bitsandbytes runs on CUDA and (from 0.45) on CPU; where it is missing or cannot run, ``base_load_kwargs``
fails before anything loads, with the fix. On CPU the 4-bit layers are kept off bitsandbytes' inference-only
repacking, so an evaluation before or during training leaves the gradients exact
(:func:`tunelab.models.load.keep_bnb_weights_trainable`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import register_method
from tunelab.methods.common import PeftMethod
from tunelab.methods.footprint import Footprint, ShapeLike
from tunelab.methods.lora import check_experts, lora_config, lora_footprint
from tunelab.methods.options import LoraOptions, QLoraOptions
from tunelab.models.load import keep_bnb_weights_trainable


def _compute_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


@register_method
class QLoRA(PeftMethod):
    name = "qlora"
    mergeable = False  # merging into quantized weights loses the update's precision

    def base_load_kwargs(self, options: QLoraOptions) -> dict:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise TunelabError("method qlora needs bitsandbytes: it is one of tunelab's dependencies: pip install 'bitsandbytes>=0.45'") from None
        if options.bits == 8:
            config = BitsAndBytesConfig(load_in_8bit=True)
        else:
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=options.quant_type,
                                        bnb_4bit_use_double_quant=options.double_quant,
                                        bnb_4bit_compute_dtype=_compute_dtype(options.compute_dtype))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return {"quantization_config": config, "device_map": {"": device}}

    def footprint(self, options: QLoraOptions, shape: ShapeLike) -> Footprint:
        """LoRA's footprint over a base quantised to ``bits``."""
        fp = lora_footprint(options, shape)
        fp.quant_bits, fp.double_quant = options.bits, options.double_quant
        return fp

    def peft_config(self, model: nn.Module, options: QLoraOptions):
        return lora_config(LoraOptions(**options.model_dump(include=set(LoraOptions.model_fields))), model)

    def check_model(self, options: QLoraOptions, model_config: Any) -> None:
        check_experts(options, model_config)

    def apply(self, model: nn.Module, options: QLoraOptions) -> nn.Module:
        from peft import prepare_model_for_kbit_training

        if not getattr(model, "is_quantized", False):
            raise TunelabError("method qlora: the base model was not loaded quantized (load it with base_load_kwargs)")
        keep_bnb_weights_trainable(model)  # a base loaded elsewhere and evaluated may have been repacked for inference
        checkpointing = bool(getattr(model, "is_gradient_checkpointing", False))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        return super().apply(model, options)
