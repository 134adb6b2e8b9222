"""IA3 (Liu et al. 2022, arXiv:2205.05638), through peft.

Learns one scaling vector per targeted activation: keys and values of attention (l_k, l_v) and the
input of the MLP's down projection (l_ff), each initialised to ones so training starts from the base
model; h <- l ⊙ h. The fewest trainable parameters of the family; mergeable into the weights.
"""

from __future__ import annotations

from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import register_method
from tunelab.methods.common import PeftMethod, without_bitsandbytes
from tunelab.methods.footprint import Footprint, ShapeLike, block_linears
from tunelab.methods.options import IA3Options
from tunelab.models.anatomy import ia3_targets


def _ia3_defaults(model_type: str) -> tuple[list[str], list[str]]:
    """peft's default IA3 targets and feed-forward targets for an architecture (llama's if unknown)."""
    try:
        with without_bitsandbytes():
            from peft.utils.constants import (
                TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as feedforward,
                TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as targets,
            )
    except ImportError:
        return ["k_proj", "v_proj", "down_proj"], ["down_proj"]
    return targets.get(model_type, targets["llama"]), feedforward.get(model_type, feedforward["llama"])


@register_method
class IA3(PeftMethod):
    name = "ia3"
    mergeable = True

    def footprint(self, options: IA3Options, shape: ShapeLike) -> Footprint:
        """One vector per block and target: d_out wide on an output, d_in wide on a feed-forward input."""
        lin = shape.linears()
        default_out, default_in = _ia3_defaults(shape.model_type)
        targets = set(block_linears(options.target_modules or default_out, shape))
        fp = Footprint(frozen_base=True)
        fp.ia3_in = targets & set(block_linears(options.feedforward_modules or default_in, shape))
        fp.ia3_out = targets - fp.ia3_in
        fp.extra = shape.layers * (sum(lin[t][1] for t in fp.ia3_out) + sum(lin[t][0] for t in fp.ia3_in))
        return fp

    def peft_config(self, model: nn.Module, options: IA3Options):
        """Unless given, the targets are found in the model (``models.anatomy.ia3_targets``): peft's defaults
        are a table of model types that misses most current architectures."""
        from peft import IA3Config

        targets, feedforward = options.target_modules, options.feedforward_modules
        if targets is None:
            targets, found_feedforward = ia3_targets(model)
            feedforward = feedforward or found_feedforward
            if not targets:
                raise TunelabError(f"method ia3: found no key, value or feed-forward projections in {type(model).__name__}; "
                                   "name them in method.target_modules (and method.feedforward_modules)")
        return IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM")
