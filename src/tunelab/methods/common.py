"""Shared behaviour of tuning methods: safe defaults, and the PEFT-backed family.

``MethodDefaults`` gives a method the conservative answers (not mergeable, not detachable, no special
base loading); ``PeftMethod`` implements save/load/merge/disable once for every method that peft
provides (LoRA, QLoRA, IA3, prefix and prompt tuning), so each of those modules only says how its
options become a peft config.

Tokens a chat-template fallback adds get embedding rows the base model does not have. They are trained
with peft's trainable tokens (in the input embedding and, when it is not tied to it, the output
embedding), so the adapter carries exactly those rows; the resized embedding matrices themselves are
not saved (peft's default would write the whole embedding: ~1.4 GB for Gemma 3 270M). A loader resizes
the base to the tokenizer and the trainable tokens overwrite every new row.

peft imports bitsandbytes whenever it is installed (``import peft`` does, and so does choosing LoRA's
layer types), and bitsandbytes logs a kernel warning on import; only a quantized base (QLoRA) needs it, so
peft is imported and applied inside :func:`without_bitsandbytes` for an unquantized model.
"""

from __future__ import annotations

import sys
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from torch import nn

from tunelab.errors import TunelabError


class MethodDefaults:
    name = "?"
    mergeable = False
    detachable = False
    incompatible: frozenset[str] = frozenset()
    default_lr = 2e-4
    trains_embeddings = False
    changes_inputs = False
    footprint = None  # a method that describes itself to the planner defines footprint(options, shape)

    def base_load_kwargs(self, options: BaseModel) -> dict:
        """Extra ``from_pretrained`` keyword arguments for the base model (quantisation, for QLoRA)."""
        return {}

    def check_model(self, options: BaseModel, model_config: Any) -> None:
        """Raise TunelabError, naming why, when the method cannot work on a model with this (transformers) config;
        called before anything loads. Every model is accepted by default."""

    def merge(self, model: nn.Module) -> nn.Module:
        raise TunelabError(f"method {self.name}: its update cannot be folded into the base weights; "
                           "load the base model and apply the artifact instead")

    def disabled(self, model: nn.Module) -> AbstractContextManager:
        raise TunelabError(f"method {self.name} changes the base weights in place; there is no base model to fall back to")

    def starts_at_base(self, options: BaseModel) -> bool:
        return self.detachable


class PeftMethod(MethodDefaults, ABC):
    """A method implemented by a peft config; the artifact is a standard PEFT adapter directory."""

    artifact = "adapter"
    detachable = True

    @abstractmethod
    def peft_config(self, model: nn.Module, options: BaseModel):
        """The peft config (``LoraConfig``, ``IA3Config``, ...) that ``options`` describe for ``model``."""

    def apply(self, model: nn.Module, options: BaseModel) -> nn.Module:
        with without_bitsandbytes(model), _without_pattern_warning():
            from peft import get_peft_model

            config = self.peft_config(model, options)
            _train_output_rows_too(model, config)
            return get_peft_model(model, config)

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True, save_embedding_layers=_embedding_layers_to_save(model))

    def load(self, base_model: nn.Module, directory: Path, trainable: bool = False) -> nn.Module:
        with without_bitsandbytes(base_model), _without_pattern_warning():
            from peft import PeftModel

            return PeftModel.from_pretrained(base_model, directory, is_trainable=trainable)

    def merge(self, model: nn.Module) -> nn.Module:
        if not self.mergeable:
            return super().merge(model)
        return model.merge_and_unload()

    def disabled(self, model: nn.Module) -> AbstractContextManager:
        return model.disable_adapter()


@contextmanager
def without_bitsandbytes(model: nn.Module | None = None) -> Iterator[None]:
    """Make bitsandbytes unimportable while peft is imported or applied to an unquantized ``model``.

    A ``None`` entry in ``sys.modules`` makes ``import bitsandbytes`` raise ImportError and
    ``importlib.util.find_spec`` return None, which peft takes for "not installed". Nothing is hidden
    for a quantized model or once bitsandbytes is imported (a quantized base was loaded in this process).
    Afterwards peft's cached availability checks are cleared, so a later QLoRA in this process sees it.
    """
    if getattr(model, "is_quantized", False) or "bitsandbytes" in sys.modules:
        yield
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]
        import_utils = sys.modules.get("peft.import_utils")
        for check in ("is_bnb_available", "is_bnb_4bit_available"):
            getattr(getattr(import_utils, check, None), "cache_clear", lambda: None)()


@contextmanager
def _without_pattern_warning() -> Iterator[None]:
    """peft warns that its own rank/alpha pattern for the second of two ``target_parameters`` of one module (a MoE
    block's fused ``gate_up_proj`` and ``down_proj``) matched no module; the adapter is right, the warning noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match")
        yield


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None) if module is not None else None


def _train_output_rows_too(model: nn.Module, config) -> None:
    """Extend trainable tokens given as a list (input embedding rows) to an untied output embedding.

    Without this, the output rows of added tokens keep their random resize values: the model could not
    learn to emit them, and a reloaded adapter would get different random rows (different logits).
    """
    indices = getattr(config, "trainable_token_indices", None)
    if not isinstance(indices, list) or not hasattr(model, "get_output_embeddings"):
        return
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is None or outputs.weight is inputs.weight:
        return  # tied: peft follows the input rows in the output layer itself
    names = _module_name(model, inputs), _module_name(model, outputs)
    if None not in names:
        config.trainable_token_indices = {names[0]: list(indices), names[1]: list(indices)}


def _base_vocab_size(model_id: str | None) -> int | None:
    """The vocabulary size of the base model on disk, or None when it cannot be read locally."""
    if not model_id or not (Path(model_id) / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_id).get_text_config().vocab_size
    except (OSError, ValueError):
        return None


def _embedding_layers_to_save(model: nn.Module) -> bool | str:
    """False when every embedding row beyond the base vocabulary is a trainable token of each embedding
    layer (the adapter holds them all); otherwise peft's own ``"auto"`` judgement (save whole layers)."""
    from peft.utils.other import TrainableTokensWrapper

    config = model.peft_config[model.active_adapter]
    if getattr(config, "trainable_token_indices", None) is None:
        return "auto"
    base_vocab = _base_vocab_size(config.base_model_name_or_path)
    vocab = getattr(model.get_base_model().config.get_text_config(), "vocab_size", None)
    if base_vocab is None or vocab is None or vocab < base_vocab:
        return "auto"
    new_rows = set(range(base_vocab, vocab))
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        if layer is None or not new_rows:
            continue
        if not isinstance(layer, TrainableTokensWrapper):
            return "auto"
        if not new_rows <= set(layer.token_adapter.token_indices.get(model.active_adapter, ())):
            return "auto"
    return False
