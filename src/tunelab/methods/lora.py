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
from typing import Any

from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import register_method
from tunelab.methods.common import PeftMethod
from tunelab.methods.footprint import Footprint, ShapeLike, block_linears
from tunelab.methods.options import LoraOptions
from tunelab.models.anatomy import expert_count, expert_parameters, linears_but_routers


def lora_config(options: LoraOptions, model: nn.Module | None = None):
    """peft's config for ``options``; with a mixture-of-experts ``model``, its fused expert weights are targets
    too (unless ``options.experts`` is false) and ``all-linear`` is spelled out without the routers, which stay
    frozen (peft's ``all-linear`` on transformers 5 adds routers and experts for some MoE types and nothing for
    others, gpt-oss among them)."""
    from peft import LoraConfig

    moe = model is not None and expert_count(model.config) > 0
    experts = expert_parameters(model) if moe and options.experts is not False else []
    targets = linears_but_routers(model) if moe and options.target_modules == "all-linear" else options.target_modules
    return LoraConfig(
        target_parameters=experts or None,
        r=options.r,
        lora_alpha=options.alpha if options.alpha is not None else 2 * options.r,
        lora_dropout=options.dropout,
        target_modules=targets,
        use_rslora=options.use_rslora,
        use_dora=options.use_dora,
        init_lora_weights={"default": True}.get(options.init, options.init),
        bias=options.bias,
        trainable_token_indices=options.trainable_token_indices,
        task_type="CAUSAL_LM",
    )


def check_experts(options: LoraOptions, model_config: Any) -> None:
    """Refuse what peft cannot do with the experts before anything loads: DoRA on fused expert weights."""
    experts = expert_count(model_config)
    if options.experts and not experts:
        raise TunelabError(f"method.experts: true, but the {getattr(model_config, 'model_type', '?')} model has no "
                           "experts; leave method.experts out")
    if experts and options.experts is not False and options.use_dora:
        raise TunelabError(f"method.use_dora: peft has no DoRA for fused expert weights, and this model has {experts} "
                           "experts per MoE layer; set method.experts=false (DoRA on attention and dense layers only) "
                           "or method.use_dora=false")


def lora_footprint(options: LoraOptions, shape: ShapeLike) -> Footprint:
    """LoRA's (and QLoRA's) footprint: r*(d_in + d_out) per target linear and block (+ d_out with DoRA),
    plus one embedding row per trainable token."""
    lin = shape.linears()
    targets = list(lin) if options.target_modules == "all-linear" else block_linears(options.target_modules, shape)
    r, tokens = options.r, options.trainable_token_indices or []
    fp = Footprint(frozen_base=True, lora={t: r for t in targets}, dropout=options.dropout, input_grad=bool(tokens))
    fp.extra = shape.layers * sum(r * (lin[t][0] + lin[t][1]) + options.use_dora * lin[t][1] for t in fp.lora)
    fp.extra += len(tokens) * shape.hidden
    return fp


@register_method
class LoRA(PeftMethod):
    name = "lora"
    mergeable = True

    def peft_config(self, model: nn.Module, options: LoraOptions):
        return lora_config(options, model)

    def check_model(self, options: LoraOptions, model_config: Any) -> None:
        check_experts(options, model_config)

    def footprint(self, options: LoraOptions, shape: ShapeLike) -> Footprint:
        """See :func:`lora_footprint`; QLoRA is the variant that fits where LoRA does not."""
        fp = lora_footprint(options, shape)
        fp.cheaper_variant = ("qlora", "4-bit base")
        return fp

    def apply(self, model: nn.Module, options: LoraOptions) -> nn.Module:
        model = super().apply(model, options)
        if options.init == "pissa":
            # PiSSA rewrites the base weights to the residual; keep the initial adapter so that save()
            # can convert the result into a LoRA of the original weights (loadable on the plain base).
            initial = tempfile.TemporaryDirectory(prefix="tunelab-pissa-")
            model.save_pretrained(initial.name, safe_serialization=True)
            model._tunelab_pissa_initial = initial  # removed with the model
        return model

    def starts_at_base(self, options: LoraOptions) -> bool:
        return options.init != "pissa"  # PiSSA moves the principal components out of the base weights

    def save(self, model: nn.Module, directory: Path) -> None:
        initial = getattr(model, "_tunelab_pissa_initial", None)
        if initial is None:
            return super().save(model, directory)
        model.save_pretrained(directory, safe_serialization=True, path_initial_model_for_weight_conversion=initial.name)
