"""The loop of the preference recipe (``dpo``): pairs of sequences, a registered preference loss, a reference.

One forward pass scores both sides of ``B`` pairs (``collate_pairs`` stacks them into ``2B`` rows);
the summed log-probabilities of each side's answer tokens (``training.logprobs``) go to the loss
(``training.preference``) together with the reference's. A step's loss is the sum over its pairs divided
by the pairs of the whole step (``training.optim``). The reference is one of:

* none, for reference-free losses (ORPO, SimPO);
* the policy with its tuning method switched off (``method.disabled``): no second copy of the weights;
* a table of log-probabilities computed once before training (:func:`reference_table`), indexed by pair,
  which ``stages.preference`` caches on disk by content so a resume or a second run reuses it.

Held-out pairs report the loss, the implicit rewards, their margin and the preference accuracy, and the
policy's own log-probability accuracy (``logp_accuracy``: the chosen answer more likely than the rejected),
which is meaningful before training too.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from rich.console import Console

from tunelab.data.preferences import TokenizedPair, collate_pairs
from tunelab.training import distributed, hooks
from tunelab.training.logprobs import sequence_logprobs
from tunelab.training.loss import to_device
from tunelab.training.optim import optimizer_step, set_lr
from tunelab.training.preference import PreferenceInputs, PreferenceLoss, PreferenceLossSpec, PreferenceOptions
from tunelab.training.reporter import StepReporter
from tunelab.training.state import TrainingState

# reference(model, batch) -> (chosen, rejected) summed log-probabilities (B,), or None for reference-free losses
Reference = Callable[[torch.nn.Module, "PairBatch"], "tuple[torch.Tensor, torch.Tensor] | None"]


@dataclass
class PairBatch:
    """``B`` pairs as ``2B`` rows (chosen first), which pairs they are, and their margins."""

    tensors: dict[str, torch.Tensor]
    indices: torch.Tensor  # (B,) positions of the pairs in their split
    margin: torch.Tensor | None

    @property
    def pairs(self) -> int:
        return len(self.indices)


def pair_batch(pairs: list[TokenizedPair], indices: list[int], pad_id: int, device) -> PairBatch:
    chosen = [pairs[i] for i in indices]
    margins = [p.margin for p in chosen]
    margin = None if all(m is None for m in margins) else torch.tensor([m or 0.0 for m in margins], device=device)
    return PairBatch(to_device(collate_pairs(chosen, pad_id), device), torch.tensor(indices), margin)


def _side_logps(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    t = batch.tensors
    return sequence_logprobs(model, t["input_ids"], t["attention_mask"], t["labels"])


def no_reference(model, batch: PairBatch) -> None:
    return None


def disabled_reference(disabled: Callable[[torch.nn.Module], object]) -> Reference:
    """The policy itself with its method switched off (``disabled(model)`` is a context manager)."""
    def reference(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), disabled(model):
            logps, _ = _side_logps(model, batch)
        return logps[: batch.pairs], logps[batch.pairs:]
    return reference


def table_reference(table: torch.Tensor) -> Reference:
    """Precomputed log-probabilities: ``table[i] = (chosen, rejected)`` of pair ``i``."""
    def reference(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        rows = table[batch.indices].to(batch.tensors["input_ids"].device)
        return rows[:, 0], rows[:, 1]
    return reference


@torch.no_grad()
def reference_table(model, pairs: list[TokenizedPair], *, batch_size: int, pad_id: int, device, autocast=nullcontext) -> torch.Tensor:
    """(N, 2) float32 on the CPU: the summed answer log-probabilities of every pair's sides under ``model``."""
    was_training = model.training
    model.eval()
    rows = []
    for start in range(0, len(pairs), batch_size):
        batch = pair_batch(pairs, list(range(start, min(start + batch_size, len(pairs)))), pad_id, device)
        with autocast():
            logps, _ = _side_logps(model, batch)
        rows.append(torch.stack([logps[: batch.pairs], logps[batch.pairs:]], dim=1).float().cpu())
    model.train(was_training)
    return torch.cat(rows) if rows else torch.zeros((0, 2))


def pair_loss(model, batch: PairBatch, reference: Reference, spec: PreferenceLossSpec, options: PreferenceOptions) -> tuple[PreferenceLoss, torch.Tensor]:
    """The loss of ``batch`` per pair, and the policy's log-probability accuracy per pair."""
    logps, counts = _side_logps(model, batch)
    b = batch.pairs
    ref = None if spec.reference_free else reference(model, batch)
    chosen_nll = -logps[:b] / counts[:b].clamp(min=1) if spec.needs_chosen_nll else None
    inputs = PreferenceInputs(logps[:b], logps[b:], *(ref or (None, None)), chosen_tokens=counts[:b], rejected_tokens=counts[b:],
                              chosen_nll=chosen_nll, margin=batch.margin)
    return spec(inputs, options), (logps[:b] > logps[b:]).float().detach()


def pair_objective(reference: Reference, spec: PreferenceLossSpec, options: PreferenceOptions):
    """``loss_fn`` for :func:`optimizer_step`: summed loss over the batch's pairs, their count, summed stats."""
    def loss_fn(model, batch: PairBatch):
        result, logp_accuracy = pair_loss(model, batch, reference, spec, options)
        return result.loss.sum(), batch.pairs, {**result.stats_sum(), "logp_accuracy": logp_accuracy.sum()}
    return loss_fn


@torch.no_grad()
def pair_metrics(model, pairs: list[TokenizedPair], reference: Reference, spec: PreferenceLossSpec, options: PreferenceOptions, *,
                 batch_size: int, pad_id: int, device, autocast=nullcontext) -> dict[str, float]:
    """Held-out pairs: mean loss, rewards, margin, preference accuracy and log-probability accuracy."""
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    for start, weight in distributed.weighted_share(list(range(0, len(pairs), batch_size))):
        batch = pair_batch(pairs, list(range(start, min(start + batch_size, len(pairs)))), pad_id, device)
        with autocast():
            result, logp_accuracy = pair_loss(model, batch, reference, spec, options)
        values = {"pref_loss": result.loss.sum(), **result.stats_sum(), "logp_accuracy": logp_accuracy.sum()}
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value.detach().double() * weight
    model.train(was_training)
    keys = sorted(sums)
    summed = distributed.all_sum(torch.stack([sums[k] for k in keys])).tolist() if keys else []
    return {f"eval_{key.replace('rewards/', '')}": value / max(len(pairs), 1) for key, value in zip(keys, summed)}


def run_pair_loss(state: TrainingState, train: list[TokenizedPair], *, loss_fn: Callable,
                  held_out: Callable[[torch.nn.Module], dict | None], pad_id: int, console: Console) -> StepReporter:
    """Train ``state`` on ``train`` pairs from its start step with ``loss_fn`` (:func:`pair_objective`, or a reward
    model's); ``held_out(model)`` gives the held-out metrics (None: no pairs held out). Returns the reporter, as
    ``token_loop.run_token_loss`` does."""
    plan, device, seconds = state.plan, state.accelerator.device, state.seconds_spent
    state.model.train()
    with StepReporter(state.run_dir, plan, state.start_step, console) as reporter:
        for step in range(state.start_step, plan.total):
            started = hooks.clock()
            micro_ids, fillers = plan.micro_batches(step), plan.fillers(step)
            micro = [pair_batch(train, list(ids), pad_id, device) for ids in micro_ids]
            real = len(micro) - fillers
            set_lr(state.optimizer, lr := plan.lr(step, seconds))
            outcome = optimizer_step(state.model, state.optimizer, state.params.values(), micro, loss_fn, accelerator=state.accelerator,
                                     count=sum(b.pairs for b in micro[:real]), max_grad_norm=state.max_grad_norm, fillers=fillers)
            seconds += hooks.clock() - started
            done = step + 1
            last = plan.is_last(done, seconds)
            tokens = sum(len(train[i].chosen.input_ids) + len(train[i].rejected.input_ids) for ids in micro_ids[:real] for i in ids)
            reporter.step(done, outcome, lr=lr, last=last, input_tokens=tokens)
            if plan.eval_due(done, last) and (metrics := held_out(state.accelerator.unwrap_model(state.model))) is not None:
                last = hooks.validated(state, reporter, done, metrics) or last
            if hooks.finish_step(state, reporter, outcome, done, last, seconds):
                break
    return reporter
