"""Freeze tuning: train only the last N transformer blocks (and/or named parameters), freeze the rest; on a
vision-language model, ``train_vision`` adds the projector's (and the vision tower's) parameters.

The oldest transfer-learning recipe, and the cheap middle ground between PEFT and full fine-tuning:
the update is a plain change of some base weights, so the artifact stores only those tensors
(safetensors) plus a small JSON file, and loading writes them back into a fresh base model. peft has no
such method, hence this module.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import register_method
from tunelab.methods.common import MethodDefaults
from tunelab.methods.footprint import Footprint, ShapeLike
from tunelab.methods.options import FreezeOptions
from tunelab.models.vision import is_vision_config, trained_vision_parts, vision_parts

CONFIG_FILE = "tunelab_freeze.json"
WEIGHTS_FILE = "trained_weights.safetensors"


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, blocks) of the model's stack of transformer blocks: its longest ModuleList."""
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module)]
    if not lists:
        raise TunelabError("method freeze: found no list of transformer blocks in this model; use method.modules to name parameters")
    return max(lists, key=lambda item: len(item[1]))


def _trained_names(model: nn.Module, options: FreezeOptions) -> list[str]:
    prefix, blocks = decoder_blocks(model)
    if options.last_n_blocks > len(blocks):
        raise TunelabError(f"method.last_n_blocks: the model has {len(blocks)} blocks, asked for {options.last_n_blocks}")
    first = len(blocks) - options.last_n_blocks
    block_prefixes = tuple(f"{prefix}.{i}." for i in range(first, len(blocks)))
    patterns = [re.compile(p) for p in options.modules]
    names = [name for name, _ in model.named_parameters()
             if name.startswith(block_prefixes) or any(p.search(name) for p in patterns)]
    if options.train_vision != "none" and is_vision_config(model.config):  # the VLM's projector (and tower) too
        parts, chosen = vision_parts(model), set(names)
        names += [n for part in trained_vision_parts(options.train_vision) for n in parts[part] if n not in chosen]
    if not names:
        raise TunelabError("method freeze: nothing to train; set method.last_n_blocks > 0 or method.modules")
    return names


@register_method
class FreezeTuning(MethodDefaults):
    name = "freeze"
    artifact = "weights"
    mergeable = True  # the update already is a change of base weights

    def apply(self, model: nn.Module, options: FreezeOptions) -> nn.Module:
        trained = set(_trained_names(model, options))
        for name, p in model.named_parameters():
            p.requires_grad_(name in trained)
        model._tunelab_freeze = options
        return model

    def footprint(self, options: FreezeOptions, shape: ShapeLike) -> Footprint:
        """The last ``last_n_blocks`` blocks and the parameters ``modules`` names train; nothing is added."""
        first = shape.layers - options.last_n_blocks
        patterns = [re.compile(p) for p in options.modules]
        trainable = {n for n in shape.parameter_table()
                     if (n.startswith("model.layers.") and int(n.split(".")[2]) >= first)
                     or any(p.search(n) for p in patterns)}
        return Footprint(frozen_base=False, trainable=trainable)

    def save(self, model: nn.Module, directory: Path) -> None:
        options: FreezeOptions = model._tunelab_freeze
        tensors = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        (directory / CONFIG_FILE).write_text(json.dumps(
            {"method": self.name, "options": options.model_dump(), "base_model": model.config._name_or_path}, indent=2) + "\n")

    def load(self, base_model: nn.Module, directory: Path, trainable: bool = False) -> nn.Module:
        try:
            options = FreezeOptions(**json.loads((directory / CONFIG_FILE).read_text())["options"])
            tensors = load_file(str(directory / WEIGHTS_FILE))
        except (OSError, ValueError, KeyError) as exc:
            raise TunelabError(f"{directory}: not a freeze-tuning artifact ({exc})") from None
        model = self.apply(base_model, options)
        params = dict(model.named_parameters())
        expected = {name for name, p in params.items() if p.requires_grad}
        if set(tensors) != expected or any(tensors[n].shape != params[n].shape for n in expected):
            raise TunelabError(f"{directory / WEIGHTS_FILE}: its tensors do not match this base model's blocks")
        for name, tensor in tensors.items():
            params[name].data.copy_(tensor)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        return model
