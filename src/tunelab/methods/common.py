"""Shared behaviour of tuning methods: safe defaults, and the PEFT-backed family.

``MethodDefaults`` gives a method the conservative answers (not mergeable, not detachable, no special
base loading); ``PeftMethod`` implements save/load/merge/disable once for every method that peft
provides (LoRA, QLoRA, IA3, prefix and prompt tuning), so each of those modules only says how its
options become a peft config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from pathlib import Path

from pydantic import BaseModel
from torch import nn

from tunelab.errors import TunelabError


class MethodDefaults:
    name = "?"
    mergeable = False
    detachable = False
    incompatible: frozenset[str] = frozenset()
    default_lr = 2e-4

    def base_load_kwargs(self, options: BaseModel) -> dict:
        """Extra ``from_pretrained`` keyword arguments for the base model (quantisation, for QLoRA)."""
        return {}

    def merge(self, model: nn.Module) -> nn.Module:
        raise TunelabError(f"method {self.name}: its update cannot be folded into the base weights; "
                           "load the base model and apply the artifact instead")

    def disabled(self, model: nn.Module) -> AbstractContextManager:
        raise TunelabError(f"method {self.name} changes the base weights in place; there is no base model to fall back to")


class PeftMethod(MethodDefaults, ABC):
    """A method implemented by a peft config; the artifact is a standard PEFT adapter directory."""

    artifact = "adapter"
    detachable = True

    @abstractmethod
    def peft_config(self, model: nn.Module, options: BaseModel):
        """The peft config (``LoraConfig``, ``IA3Config``, ...) that ``options`` describe for ``model``."""

    def apply(self, model: nn.Module, options: BaseModel) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(model, options))

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)

    def load(self, base_model: nn.Module, directory: Path) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, directory)

    def merge(self, model: nn.Module) -> nn.Module:
        if not self.mergeable:
            return super().merge(model)
        return model.merge_and_unload()

    def disabled(self, model: nn.Module) -> AbstractContextManager:
        return model.disable_adapter()
