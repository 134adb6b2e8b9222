"""Soft prompts: prompt tuning (Lester et al. 2021, arXiv:2104.08691) and prefix tuning (Li & Liang
2021, arXiv:2101.00190), through peft.

Prompt tuning learns ``num_virtual_tokens`` input embeddings placed before every sequence (random, or
initialised from the embeddings of a text). Prefix tuning learns key/value vectors for every layer,
prepended to each attention's keys and values, optionally produced by a two-layer MLP during training
(the reparameterisation the paper uses for stability). Neither touches the base weights, so neither
can be merged; both change the sequence the model sees, so several examples per row (packing) and
gradient checkpointing are refused before training.

Initialisation decides whether training starts from the base model or from a broken one. peft's random
initialisations draw from N(0, 1), orders of magnitude away from the activations a trained model
produces: on SmolLM2-135M a random 20-token prefix made the first training loss 10.6 against 1.8
without it, and 15 steps did not repair it (bench/NOTES.md). So both methods start from a text by
default (``init_text``, a neutral instruction unless given): prompt tuning from the text's token
embeddings (peft's TEXT init), prefix tuning from the keys and values the base model itself computes
for that text in every layer. The latter is written here because peft has no such initialisation;
with it, the prefixed model at step 0 is exactly the base model reading the text first (tested).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunelab.methods.base import register_method
from tunelab.errors import TunelabError
from tunelab.methods.common import PeftMethod
from tunelab.methods.footprint import Footprint, ShapeLike
from tunelab.methods.options import PrefixOptions, PromptOptions
from tunelab.models.anatomy import non_attention_layers, reads_ids_in_every_layer, uneven_keys_values


class SoftPromptMethod(PeftMethod):
    """Prompt and prefix tuning: extra positions in front of every sequence, so no packing and no checkpointing."""

    incompatible = frozenset({"packing", "gradient_checkpointing"})
    changes_inputs = True  # the logits at a position are not the decoder's own: no KL toward the untuned model

    def check_model(self, options: PromptOptions | PrefixOptions, model_config: Any) -> None:
        """A soft prompt has embeddings but no token ids: refuse models whose every layer reads the ids."""
        if reads_ids_in_every_layer(model_config):
            raise TunelabError(f"method {self.name} cannot tune {_kind(model_config)}: every layer also reads its own "
                               "embedding of the token ids (per-layer inputs), which virtual tokens do not have; "
                               "use lora, ia3 or full")


@register_method
class PromptTuning(SoftPromptMethod):
    name = "prompt"

    def footprint(self, options: PromptOptions, shape: ShapeLike) -> Footprint:
        """``num_virtual_tokens`` trained input embeddings in front of every row (so every position has logits)."""
        tokens = options.num_virtual_tokens
        return Footprint(frozen_base=True, virtual_tokens=tokens, extra=tokens * shape.hidden, full_logits=True,
                         input_grad=True)

    def peft_config(self, model: nn.Module, options: PromptOptions):
        from peft import PromptTuningConfig, PromptTuningInit

        init = {"text": PromptTuningInit.TEXT, "vocab": PromptTuningInit.SAMPLE_VOCAB, "random": PromptTuningInit.RANDOM}
        text = {"prompt_tuning_init_text": options.init_text, "tokenizer_name_or_path": model.config._name_or_path}
        return PromptTuningConfig(num_virtual_tokens=options.num_virtual_tokens, task_type="CAUSAL_LM",
                                  prompt_tuning_init=init[options.init], **(text if options.init == "text" else {}))


@register_method
class PrefixTuning(SoftPromptMethod):
    name = "prefix"

    def footprint(self, options: PrefixOptions, shape: ShapeLike) -> Footprint:
        """Trained keys and values for ``num_virtual_tokens`` positions in every block, or the MLP making them.

        peft sizes the prefix by the key/value width (``token_dim`` = kv_heads * head_dim), not the hidden
        size: the projection's input embedding and first layer are that wide too.
        """
        token_dim = shape.kv_heads * shape.head_dim
        length, width, hidden = options.num_virtual_tokens, shape.layers * 2 * token_dim, options.projection_hidden
        extra = (length * token_dim + token_dim * hidden + hidden + hidden * width + width
                 if options.projection else length * width)
        return Footprint(frozen_base=True, prefix=length, extra=extra, full_logits=True)

    def peft_config(self, model: nn.Module, options: PrefixOptions):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(num_virtual_tokens=options.num_virtual_tokens, prefix_projection=options.projection,
                                  encoder_hidden_size=options.projection_hidden, task_type="CAUSAL_LM")

    def check_model(self, options: PromptOptions | PrefixOptions, model_config: Any) -> None:
        """The prefix is keys and values of one width for every layer: refuse layers without them or of other widths."""
        super().check_model(options, model_config)
        others, uneven = non_attention_layers(model_config), uneven_keys_values(model_config)
        why = (f"its {', '.join(others)} layers keep no keys and values to put a prefix in front of" if others
               else f"{uneven}, and peft's prefix is one key/value width for every layer" if uneven else None)
        if why:
            raise TunelabError(f"method prefix cannot tune {_kind(model_config)}: {why}; use prompt, lora or ia3")

    def apply(self, model: nn.Module, options: PrefixOptions) -> nn.Module:
        tuned = super().apply(model, options)
        if options.from_text:
            _prefix_from_text(tuned, options.init_text, options.num_virtual_tokens)
        return tuned


def _kind(model_config: Any) -> str:
    return f"a {getattr(model_config, 'model_type', '?')} model"


def text_token_ids(model: nn.Module, text: str, length: int) -> list[int]:
    """``text`` tokenized with the model's own tokenizer, repeated or cut to ``length`` tokens."""
    from tunelab.models.load import load_tokenizer

    ids = load_tokenizer(model.config._name_or_path)(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TunelabError(f"method.init_text {text!r} has no tokens; give a non-empty text")
    return (ids * (length // len(ids) + 1))[:length]


def _layer_keys_values(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of one layer, each (batch, kv_heads, tokens, head_dim), across transformers' cache APIs."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return cache.layers[layer].keys, cache.layers[layer].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[layer], cache.value_cache[layer]
    return cache[layer]


@torch.no_grad()
def _prefix_from_text(peft_model: nn.Module, text: str, length: int) -> None:
    """Set the prefix to the base model's own keys/values for ``text`` at positions 0..length-1.

    peft stores the prefix as one embedding row per virtual token, laid out as (layer, key|value, head,
    head_dim) flattened, which ``PeftModelForCausalLM.get_prompt`` views back into per-layer keys/values.
    """
    base = peft_model.get_base_model()
    ids = torch.tensor([text_token_ids(base, text, length)], device=base.device)
    was_training = base.training
    base.eval()
    try:
        cache = base(input_ids=ids, use_cache=True).past_key_values
    finally:
        base.train(was_training)
    config = peft_model.active_peft_config
    rows = []
    for layer in range(config.num_layers):
        for tensor in _layer_keys_values(cache, layer):
            rows.append(tensor[0].transpose(0, 1).reshape(length, -1))  # (tokens, kv_heads * head_dim)
    weight = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight
    prefix = torch.cat(rows, dim=1)
    if prefix.shape != weight.shape:
        raise TunelabError(f"prefix init: the model's keys/values {tuple(prefix.shape)} do not fit peft's prefix "
                           f"{tuple(weight.shape)} (model type {base.config.model_type}); set method.init: random")
    weight.copy_(prefix.to(weight.dtype))
