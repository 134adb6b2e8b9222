"""Token-summed causal-LM loss, so gradient accumulation normalises by trained tokens, not micro-batches.

A mean of per-micro-batch means over-weights short micro-batches; we sum the cross-entropy over every
trained token of a micro-batch and divide by the trained-token count of the whole accumulated step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def trained_token_count(labels: torch.Tensor) -> int:
    """Number of positions whose next token is trained (labels are unshifted, (B, T))."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


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
_PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral", "phi3", "smollm3", "olmo2"})


def _plain_causal_lm(model):
    """The underlying HF model if its trained-position fast path is exact, else None.

    Exact for plain models and LoRA (its layers sit inside the decoder); not for prompt/prefix tuning,
    whose PEFT wrapper changes the inputs, nor for heads with scaling or soft-capping.
    """
    base = model
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        config = model.peft_config[model.active_adapter]
        if str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
            return None
        base = model.get_base_model()
    if getattr(base.config, "model_type", None) not in _PLAIN_HEAD_MODEL_TYPES:
        return None
    if base.get_output_embeddings() is None or not hasattr(base, "model"):
        return None
    return base


def summed_loss_of_batch(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token loss of a batch, computing logits only at trained positions when exact.

    Most tokens of an instruction example are prompt (often > 80 %), so projecting only the trained
    positions onto the vocabulary saves most of the lm_head matmul and cross-entropy, in memory and time.
    Falls back to full logits where that shortcut would not be exact.
    """
    base = _plain_causal_lm(model)
    if base is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return summed_token_loss(logits, batch["labels"])
    hidden = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]  # (B, T-1)
    trained = targets != IGNORE_INDEX
    logits = base.get_output_embeddings()(hidden[:, :-1][trained]).float()  # (N, V) for N trained positions
    return F.cross_entropy(logits, targets[trained], reduction="sum")
