"""Token-summed causal-LM loss, so gradient accumulation normalises by trained tokens, not micro-batches.

A mean of per-micro-batch means over-weights short micro-batches; we sum the cross-entropy over every
trained token of a micro-batch and divide by the trained-token count of the whole accumulated step.

Batches are padded (``attention_mask``) or packed (``position_ids`` restarting at 0 for each example,
no mask; see ``tunelab.data.packing``); both give the same summed loss for the same examples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tunelab.data import TokenizedExample, collate
from tunelab.data.packing import check_packed_attention
from tunelab.data.vision import TOKEN_INPUTS, VISION_INPUTS
from tunelab.errors import TunelabError
from tunelab.training import distributed
from tunelab.training.linear_cross_entropy import chunk_rows, linear_cross_entropy_sum

IGNORE_INDEX = -100


def trained_token_count(labels: torch.Tensor) -> int:
    """Number of positions whose next token is trained (labels are unshifted, (B, T))."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices ``row * T + t`` of the positions whose next token is trained, in row-major order.

    Computed where the labels are (on the host, before the batch moves to a GPU), so the loss can gather
    those positions with ``index_select`` instead of a boolean mask, whose output size the host would
    have to wait for.
    """
    seq = labels.shape[1]
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * seq + cols


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """A collated batch on ``device``, with its ``trained_index`` (see :func:`trained_positions`).

    On a GPU the host tensors are pinned and copied asynchronously: nothing here waits for the GPU.
    """
    device = torch.device(device)
    moved = {**batch, "trained_index": trained_positions(batch["labels"])}
    if device.type != "cuda":
        return {k: v.to(device) for k, v in moved.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in moved.items()}


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over trained positions.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) token ids, IGNORE_INDEX where no loss is taken; position t predicts labels[t+1].
    """
    vocab = logits.shape[-1]
    shifted_logits = logits[:, :-1, :].reshape(-1, vocab).float()  # (B*(T-1), V)
    shifted_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")


# Architectures whose logits are exactly lm_head(final hidden state): no logit scaling or soft-capping.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral", "phi3", "smollm3", "olmo2"})

# PEFT methods whose layers sit inside the decoder (they replace or scale its linear layers), so the
# decoder's last hidden state followed by lm_head is still exactly the model's output.
_IN_DECODER_PEFT_TYPES = frozenset({"LORA", "IA3"})


def _peft_config(model):
    """The active PEFT config of a PEFT-wrapped model, else None."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.peft_config[model.active_adapter]
    return None


def plain_causal_lm(model):
    """The underlying HF model if its trained-position fast path is exact, else None.

    Exact for plain models (also with modules added inside the decoder, such as bottleneck adapters or
    freeze tuning) and for LoRA and IA3 (their layers sit inside the decoder); not for prompt/prefix
    tuning, whose PEFT wrapper changes the inputs, nor for heads with scaling or soft-capping. Never for a
    DDP-wrapped or FSDP-sharded model: DDP synchronises gradients and FSDP gathers parameters only in the
    wrapped model's own forward, which the fast path would bypass (silently unsynchronised gradients), so
    there the loss is computed from the full logits.
    """
    if distributed.wrapped(model):
        return None
    base = model
    config = _peft_config(model)
    if config is not None:
        if str(getattr(config.peft_type, "value", config.peft_type)) not in _IN_DECODER_PEFT_TYPES:
            return None
        base = model.get_base_model()
    if getattr(base.config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    if base.get_output_embeddings() is None or not hasattr(base, "model"):
        return None
    return base


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """Keyword arguments for the forward pass of a padded or packed batch.

    A padded batch has an ``attention_mask``; a packed one has ``position_ids`` restarting at 0 for each
    example and no mask (see ``tunelab.data.packing``). transformers derives the per-example attention
    from those position ids only when it is given no KV cache, hence ``use_cache=False`` for packed
    batches.
    """
    inputs: dict[str, torch.Tensor | bool] = {"input_ids": batch["input_ids"]}
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = batch["attention_mask"]
    inputs.update({k: batch[k] for k in VISION_INPUTS + TOKEN_INPUTS if batch.get(k) is not None})  # a VLM's images
    if batch.get("position_ids") is not None:
        inputs["position_ids"] = batch["position_ids"]
        inputs["use_cache"] = False
    return inputs


def summed_loss_of_batch(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token loss of a batch, computing logits only at trained positions when exact.

    Most tokens of an instruction example are prompt (often > 80 %), so projecting only the trained
    positions onto the vocabulary saves most of the lm_head matmul and cross-entropy, in memory and time.
    Falls back to full logits where that shortcut would not be exact.

    Args:
        model: A causal LM, PEFT-wrapped or not.
        batch: ``input_ids`` and ``labels`` (B, T), plus either ``attention_mask`` (padded batch) or
            ``position_ids`` without a mask (packed batch, see ``tunelab.data.packing``); optionally
            ``trained_index`` from :func:`to_device` (without it the positions are found here, which
            makes the host wait for a GPU).
    """
    inputs = _model_inputs(batch)
    labels = batch["labels"]  # (B, T)
    if "position_ids" in inputs:
        check_packed_attention(model, rows=labels.shape[0])
    base = plain_causal_lm(model)
    if base is None:
        config = _peft_config(model)
        if "position_ids" in inputs and config is not None and getattr(config, "is_prompt_learning", False):
            kind = getattr(config.peft_type, "value", config.peft_type)
            raise TunelabError(
                f"packing cannot be used with {kind} (its virtual tokens are added once per row, "
                "not per example); set train.packing=false"
            )
        logits = model(**inputs).logits  # (B, T, V), or (B, P+T, V) with P virtual tokens in front (prompt tuning)
        return summed_token_loss(logits[:, -labels.shape[1] :], labels)
    inputs["use_cache"] = False
    hidden = base.model(**inputs).last_hidden_state  # (B, T, H)
    index = batch.get("trained_index")
    if index is None:
        index = trained_positions(labels)
    trained_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)  # (N, H) for N trained positions
    targets = labels.reshape(-1).index_select(0, index + 1)  # the next token of each
    head = base.get_output_embeddings()
    if type(head) is torch.nn.Linear and head.bias is None and index.shape[0] > chunk_rows(head.out_features):
        return linear_cross_entropy_sum(trained_hidden, head.weight, targets)  # never all N x V logits at once
    logits = head(trained_hidden).float()  # (N, V)
    return F.cross_entropy(logits, targets, reduction="sum")


@torch.no_grad()
def validation_loss(model, examples: list[TokenizedExample], *, batch_size: int, pad_id: int, device, autocast) -> dict[str, float]:
    """Mean loss per trained token over ``examples`` and its perplexity (with several processes each computes a
    share of the batches and all return the whole set's figures).

    Args:
        model: The model under training; put in eval mode for the pass and restored after.
        examples: Tokenized evaluation examples.
        batch_size: Examples per forward pass.
        pad_id: Padding token id.
        device: Where to run.
        autocast: A context-manager factory (``accelerator.autocast``) for mixed precision.
    """
    was_training = model.training
    model.eval()
    total, tokens = torch.zeros((), dtype=torch.float64, device=device), 0.0
    for start, weight in distributed.weighted_share(list(range(0, len(examples), batch_size))):
        batch = collate(examples[start : start + batch_size], pad_id)
        tokens += trained_token_count(batch["labels"]) * weight
        batch = to_device(batch, device)
        with autocast():
            total += summed_loss_of_batch(model, batch).double() * weight
    if was_training:
        model.train()
    total, tokens = distributed.all_sum(torch.stack([total, torch.tensor(tokens, dtype=torch.float64, device=device)]))
    loss = float(total) / max(float(tokens), 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
