"""A reward model: a causal LM (with any tuning method) and a scalar head on the hidden state of the last token.

Hand-written rather than ``AutoModelForSequenceClassification``: that class swaps the LM head for a new
model class, so the tuning methods (applied to the causal LM), the run's artifact layout and the loaders
of every other recipe would need a second code path. Here the causal LM is the one every recipe trains
and the head is one ``nn.Linear(hidden, 1)`` saved next to the method's artifact
(``reward_head.safetensors``). The score of a sequence is the head applied to the final hidden state of
its last real token (the end-of-turn token after the answer, as the chat template renders it), as in
InstructGPT's reward model (Ouyang et al. 2022). Training: ``-log σ(r_chosen − r_rejected − margin)``
(``training.preference.reward_pair_loss``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.training.loss import plain_causal_lm
from tunelab.training.preference import reward_pair_loss

HEAD_FILE = "reward_head.safetensors"


def new_head(model, seed: int) -> nn.Linear:
    """A float32 head for ``model``'s hidden size, initialised from ``seed`` (small weights: scores start near 0)."""
    hidden = model.get_input_embeddings().weight.shape[1]
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(hidden, 1)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1, hidden, generator=generator) / hidden)
        head.bias.zero_()
    return head


def last_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, H) the final hidden state at each row's last real token (rows right-padded)."""
    base = plain_causal_lm(model)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if base is not None:
        hidden = base.model(**inputs).last_hidden_state
    else:  # prompt tuning puts virtual tokens first: take the last positions of the full output
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1][:, -input_ids.shape[1]:]
    last = attention_mask.sum(dim=1) - 1
    return hidden[torch.arange(len(last), device=hidden.device), last]


def scores(model, head: nn.Linear, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) float32 rewards."""
    return head(last_hidden(model, input_ids, attention_mask).float()).squeeze(-1)


def reward_objective(head: nn.Linear):
    """``loss_fn`` for ``optimizer_step`` over a ``pair_loop.PairBatch``: summed pair loss, pairs, summed stats."""
    def loss_fn(model, batch):
        t = batch.tensors
        r = scores(model, head, t["input_ids"], t["attention_mask"])
        result = reward_pair_loss(r[: batch.pairs], r[batch.pairs:], batch.margin)
        return result.loss.sum(), batch.pairs, result.stats_sum()
    return loss_fn


@torch.no_grad()
def reward_metrics(model, head: nn.Linear, pairs: list, *, batch_size: int, pad_id: int, device, autocast) -> dict[str, float]:
    """Held-out pairs: mean pair loss, pairwise accuracy (chosen scored higher), mean scores and their margin."""
    from tunelab.training.pair_loop import pair_batch

    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    loss_fn = reward_objective(head)
    for start in range(0, len(pairs), batch_size):
        batch = pair_batch(pairs, list(range(start, min(start + batch_size, len(pairs)))), pad_id, device)
        with autocast():
            loss, _, stats = loss_fn(model, batch)
        for key, value in {"pair_loss": loss, **stats}.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    model.train(was_training)
    return {f"eval_{key.replace('rewards/', '')}": value / max(len(pairs), 1) for key, value in sums.items()}


def save_head(head: nn.Linear, directory: Path) -> None:
    from safetensors.torch import save_file

    save_file({"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu().contiguous()},
              str(Path(directory) / HEAD_FILE))


def load_head(directory: Path) -> nn.Linear:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / HEAD_FILE
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise TunelabError(f"{path}: cannot be read ({exc}); is this the artifact of a `recipe: reward` run?") from None
    head = nn.Linear(tensors["weight"].shape[1], 1)
    head.load_state_dict(tensors)
    return head
