"""Checks that models can be merged at all: the same tensors, the same vocabulary, the same chat template.

Merging averages weights entry by entry, so it is only meaningful between models of one family: the
same parameter names, shapes and dtypes, and (for whole models) the same token ids meaning the same
tokens and the same chat template, or the merged model would read its prompts differently from some of
the models it was made of. Each check names what differs instead of failing deep inside torch.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.errors import TunelabError

_SHOWN = 5  # names listed in a message before "and N more"


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def check_state_dicts(base: dict[str, torch.Tensor] | None, models: list[Any]) -> None:
    """Refuse state dicts that differ from the first (the base, else the first model) in names, shapes or dtypes.

    Args:
        base: The base model's state dict, or None.
        models: ``MergeInput`` values (``state`` and ``name`` attributes).

    Raises:
        TunelabError: Naming the model and the parameters that are missing, extra, or of another shape or dtype.
    """
    inputs = ([("base", base)] if base is not None else []) + [(m.name, m.state) for m in models]
    ref_name, reference = inputs[0]
    for name, state in inputs[1:]:
        missing = sorted(set(reference) - set(state))
        extra = sorted(set(state) - set(reference))
        if missing or extra:
            parts = ([f"lacks {_listed(missing)}"] if missing else []) + ([f"has extra {_listed(extra)}"] if extra else [])
            raise TunelabError(f"cannot merge: {name} {' and '.join(parts)} compared with {ref_name}; "
                               "merge only models of the same architecture and size")
        for key, tensor in reference.items():
            other = state[key]
            if other.shape != tensor.shape:
                raise TunelabError(f"cannot merge: {key} is {tuple(other.shape)} in {name} but {tuple(tensor.shape)} in "
                                   f"{ref_name}; merge only models of the same architecture and size (a resized vocabulary?)")
            if other.dtype != tensor.dtype:
                raise TunelabError(f"cannot merge: {key} is {other.dtype} in {name} but {tensor.dtype} in {ref_name}; "
                                   "load every model in one dtype (e.g. float32) before merging")
            if not tensor.is_floating_point() and not torch.equal(other, tensor):
                raise TunelabError(f"cannot merge: the integer tensor {key} differs between {name} and {ref_name}")


# Config fields that must agree for two models' weights to mean the same thing.
_CONFIG_FIELDS = ("model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "intermediate_size", "tie_word_embeddings", "rope_theta")
_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _config_value(config: Any, field: str) -> Any:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, field, getattr(config, field, None))


def _vocabulary_difference(tok_a: Any, tok_b: Any) -> str | None:
    if len(tok_a) != len(tok_b):
        return f"vocabulary size {len(tok_a)} vs {len(tok_b)}"
    vocab_a, vocab_b = tok_a.get_vocab(), tok_b.get_vocab()
    differing = sorted(t for t in vocab_a if vocab_b.get(t) != vocab_a[t])
    if differing:
        token = differing[0]
        return (f"{len(differing)} token(s) have other ids, e.g. {token!r}: id {vocab_a[token]} vs "
                f"{vocab_b.get(token, 'absent')}")
    return None


def model_family_differences(config_a: Any, tokenizer_a: Any, config_b: Any, tokenizer_b: Any) -> list[str]:
    """What differs between two models that merging needs equal: config fields, vocabulary, special tokens,
    chat template. Empty when they can be merged."""
    found = []
    for field in _CONFIG_FIELDS:
        a, b = _config_value(config_a, field), _config_value(config_b, field)
        if a != b:
            found.append(f"config {field}: {a!r} vs {b!r}")
    vocabulary = _vocabulary_difference(tokenizer_a, tokenizer_b)
    if vocabulary:
        found.append(vocabulary)
    for attribute in _SPECIAL_TOKENS:
        a, b = getattr(tokenizer_a, attribute, None), getattr(tokenizer_b, attribute, None)
        if str(a) != str(b):
            found.append(f"{attribute}: {a!r} vs {b!r}")
    if getattr(tokenizer_a, "chat_template", None) != getattr(tokenizer_b, "chat_template", None):
        found.append("chat template differs (the models would read their prompts differently)")
    return found


def check_same_family(config_a: Any, tokenizer_a: Any, config_b: Any, tokenizer_b: Any, *, names: tuple[str, str] = ("a", "b")) -> None:
    """Refuse to merge two models whose configs, vocabularies or chat templates differ, naming each difference.

    Args:
        config_a, config_b: ``transformers`` model configs.
        tokenizer_a, tokenizer_b: Their tokenizers (as saved with the models, with their chat templates).
        names: How the two models are called in the message (paths, aliases).

    Raises:
        TunelabError: Listing every difference found.
    """
    found = model_family_differences(config_a, tokenizer_a, config_b, tokenizer_b)
    if found:
        lines = "\n".join(f"  - {d}" for d in found)
        raise TunelabError(f"cannot merge {names[0]} with {names[1]}: they are not the same model family:\n{lines}\n"
                           "Merge only fine-tunes of one base model that kept its tokenizer and chat template.")
