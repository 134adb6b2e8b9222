"""Gradient checkpointing of some decoder blocks, not only all or none.

transformers switches checkpointing on for every block (``gradient_checkpointing_enable``); each block
(a ``GradientCheckpointingLayer``) then reads its own ``gradient_checkpointing`` flag, so clearing the
flag on the later blocks leaves exactly the first ``blocks`` recomputing their activations. How many is
decided by the memory plan (``tunelab.planning.checkpointed_blocks``).
"""

from __future__ import annotations

import sys

from torch import nn

EVERY_BLOCK = sys.maxsize  # ``blocks`` for checkpointing all of them, however many the model has


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
