"""The model side of a training run: refuse what the method cannot do, load the base, apply the method.

Method knowledge stays in ``tunelab.methods``: what a method cannot be combined with is its
``incompatible`` set, how its base loads is its ``base_load_kwargs``, and whether it can train the
embedding rows of tokens a chat-template fallback added is its options (``trainable_token_indices``) or
its ``trains_embeddings`` flag.

Gradient checkpointing can cover some decoder blocks, not only all or none: transformers switches it on for
every block (``gradient_checkpointing_enable``); each block (a ``GradientCheckpointingLayer``) then reads its
own ``gradient_checkpointing`` flag, so clearing the flag on the later blocks leaves exactly the first ones
recomputing their activations. How many is decided by the memory plan (``tunelab.planning.checkpointed_blocks``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.markup import escape
from torch import nn

from tunelab.config.schema import RunConfig
from tunelab.errors import TunelabError
from tunelab.methods import TuningMethod, get_method, trainable_parameters
from tunelab.methods.options import vision_training
from tunelab.stages.lineage import read_parent, start_from_parent
from tunelab.stages.setup import load_base_model
from tunelab.stages.vision import check_vision_training, freeze_vision, vision_options

EVERY_BLOCK = sys.maxsize  # ``blocks`` for checkpointing all of them, however many the model has


@dataclass
class TunedModel:
    """The model with the method applied: what trains, and how many blocks recompute activations."""

    model: nn.Module
    method: TuningMethod
    params: dict[str, nn.Parameter]
    checkpointed_blocks: int


def check_method_fits(config: RunConfig, added_tokens: list[str] | None = None) -> None:
    """Refuse, before anything loads, run features the tuning method cannot be combined with, and a
    method that cannot train the tokens a chat-template fallback adds."""
    method = get_method(config.method.name)
    asked = {"packing": config.train.packing, "gradient_checkpointing": config.train.gradient_checkpointing is True}
    clashes = sorted(feature for feature, on in asked.items() if on and feature in method.incompatible)
    if clashes:
        raise TunelabError(f"method {method.name} cannot be combined with " + ", ".join(f"train.{c}=true" for c in clashes)
                           + " (it changes the sequence the model attends over); set " + ", ".join(f"train.{c}=false" for c in clashes))
    if config.data.replay is not None and config.data.replay.kl and method.changes_inputs:
        raise TunelabError(f"data.replay.kl needs the model's own next-token distributions at the answer positions; method "
                           f"{method.name} puts extra positions in front of every sequence. Set data.replay.kl=0 or use "
                           "another method (lora, full, ...)")
    model_config = _model_config(config)
    if model_config is not None:
        method.check_model(config.method, model_config)
    check_vision_training(config.method, model_config)  # method.train_vision on a text-only model
    if added_tokens and not _can_train_added_tokens(method):
        raise TunelabError(
            f"the model has no chat template, so tunelab's template uses the tokens {added_tokens}, whose embeddings are "
            f"new or were never learned as turn markers; method {method.name} cannot train them. Give data.chat_template (a template using the model's own tokens) "
            "or use a method that trains embedding rows (lora, qlora or full)"
        )


def _model_config(config: RunConfig):
    """The base model's transformers config (config.json only), or None where it cannot be read here (loading
    the model reports that)."""
    from transformers import AutoConfig

    from tunelab.models.load import resolve_model_path

    try:
        return AutoConfig.from_pretrained(resolve_model_path(config.model.path), trust_remote_code=config.model.trust_remote_code)
    except Exception:  # noqa: BLE001 - unreadable here: the load that follows says why
        return None


def _can_train_added_tokens(method: TuningMethod) -> bool:
    return "trainable_token_indices" in method.options_class.model_fields or method.trains_embeddings


def checkpointed_blocks(config: RunConfig, train_examples: list, console: Console) -> int:
    """Decoder blocks to checkpoint: none, all, or for ``auto`` as many as the memory plan of this data on
    this device needs (``tunelab.planning.checkpointed_blocks``)."""
    setting = config.train.gradient_checkpointing
    if setting != "auto":
        return EVERY_BLOCK if setting else 0
    from tunelab.planning import AUTO_CHECKPOINTING_SHARE, checkpointed_blocks as planned, load_shape, profile_examples, resolve_device

    try:
        shape, device = load_shape(config), resolve_device("current")
        blocks = planned(config, shape, device, profile_examples(config, train_examples))
    except Exception as exc:  # noqa: BLE001 - a model the planner cannot read (e.g. no intermediate_size) must still train
        console.print(f"[yellow]warning:[/] no memory plan for this model ({type(exc).__name__}: {escape(str(exc))}); "
                      "train.gradient_checkpointing=auto leaves checkpointing off (set true to force it)", soft_wrap=True)
        return 0
    if blocks:
        console.print(f"gradient checkpointing in {blocks} of {shape.layers} blocks (train.gradient_checkpointing=auto: the "
                      f"planned peak must fit {AUTO_CHECKPOINTING_SHARE:.0%} of {device.memory_bytes / 2**30:.1f} GiB; "
                      "see tunelab plan)", soft_wrap=True)
    return blocks


def load_base(config: RunConfig, model_path: str, tokenizer, added_tokens: list[str], device) -> nn.Module:
    """The model training starts from, on ``device``: the base loaded as the method needs (quantized for QLoRA),
    with embeddings resized for tokens a chat-template fallback added; with ``init_from``, the parent run's
    artifact on it (trainable) or merged into it (``stages.lineage``)."""
    torch.manual_seed(config.train.seed)
    extra = get_method(config.method.name).base_load_kwargs(config.method)
    base = load_base_model(config, model_path, tokenizer, added_tokens, device, **extra)
    return start_from_parent(read_parent(config), base)


def continues_parent(config: RunConfig) -> bool:
    """The run trains its ``init_from`` parent's artifact on (rather than a freshly applied method)."""
    return config.init_from is not None and not config.init_from_merge


def start_is_method_off(config: RunConfig) -> bool:
    """The model training starts from is the tuned model with its method switched off (``disabled``): then a
    reference to the start model (DPO's, the replay's KL) needs no second copy of the weights."""
    method = get_method(config.method.name)
    return method.detachable and not continues_parent(config) and method.starts_at_base(config.method)


def apply_method(config: RunConfig, model: nn.Module, tokenizer, added_tokens: list[str], checkpointed: int = 0) -> TunedModel:
    """Apply the tuning method with gradient checkpointing in the first ``checkpointed`` decoder blocks."""
    torch.manual_seed(config.train.seed)
    enable_checkpointing(model, checkpointed)
    model.config.use_cache = False
    method = get_method(config.method.name)
    options = vision_options(model, config.method)  # a VLM: LoRA on the language model (+ the parts train_vision names)
    if added_tokens and "trainable_token_indices" in type(options).model_fields and options.trainable_token_indices is None:
        # Tokens of the chat-template fallback start random (added) or untrained as turn markers (a base
        # model's own): train their rows so the model can read <|im_start|> and learn to emit <|im_end|>.
        options = options.model_copy(update={"trainable_token_indices": tokenizer.convert_tokens_to_ids(added_tokens)})
    try:
        if not continues_parent(config):  # (a continued parent's artifact was loaded trainable by load_base)
            model = method.apply(model, options)
    except ValueError as exc:  # e.g. peft: target modules not found in the model
        raise TunelabError(f"method {config.method.name}: {exc}") from None
    freeze_vision(model, vision_training(config.method))  # tower and projector as pretrained unless train_vision says
    checkpointed = limit_checkpointing(model, checkpointed)
    params = trainable_parameters(model)
    if any(p.dtype == torch.float16 for p in params.values()):
        raise TunelabError(
            "model.dtype: float16 weights cannot be trained directly (AdamW underflows and the run turns to NaN); "
            "load float32 (model.dtype=float32) and use train.precision=fp16 or bf16 for mixed precision"
        )
    return TunedModel(model, method, params, checkpointed)


def enable_checkpointing(model: nn.Module, blocks: int) -> None:
    """Switch on gradient checkpointing (non-reentrant) before the tuning method is applied, if ``blocks``."""
    if blocks:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def limit_checkpointing(model: nn.Module, blocks: int) -> int:
    """Keep checkpointing on in the first ``blocks`` decoder blocks only (after the method is applied, as
    QLoRA's preparation switches it on everywhere again); returns how many blocks checkpoint."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for index, layer in enumerate(layers):
        if index >= blocks:
            layer.gradient_checkpointing = False
    return sum(bool(layer.gradient_checkpointing) for layer in layers)
