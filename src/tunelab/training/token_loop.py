"""The loop of the recipes whose objective is the token-summed cross-entropy (``sft``, ``pretrain``).

Recipes with other objectives (preference pairs, sampled completions) write their own short loop over the
same components: :class:`~tunelab.training.plan.StepPlan` for steps and learning rates,
:func:`~tunelab.training.optim.optimizer_step` for accumulation/clipping/stepping,
:class:`~tunelab.training.reporter.StepReporter` for logging, :meth:`~tunelab.training.state.TrainingState.save`
for checkpoints (through :func:`~tunelab.training.hooks.finish_step`).
``max_seconds`` ends the loop early: time is counted over optimizer steps only (not validation or
checkpoints), summed over resumes.

Per-source losses: when the run trains on a mixture (``state.sources``), each micro-batch is split by source
into sub-batches that go through the step one after another (the step's gradient is the same sum), so each
source's summed loss and trained tokens are known exactly; the log has ``loss/NAME`` (mean over that
source's trained tokens in the step) and ``tokens/NAME``. The cost is one more, smaller forward/backward per
source present in a micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from rich.console import Console

from tunelab.data import TokenizedExample
from tunelab.training import hooks
from tunelab.training.loss import summed_loss_of_batch, to_device, trained_token_count
from tunelab.training.optim import optimizer_step, set_lr
from tunelab.training.reporter import StepReporter
from tunelab.training.state import TrainingState
from tunelab.training.loss import validation_loss


def run_token_loss(state: TrainingState, train: list[TokenizedExample], evals: list[TokenizedExample], *, pad_id: int,
                   make_batch: Callable, console: Console, eval_batch_size: int, token_loss: Callable | None = None,
                   source_loss: dict[str, Callable] | None = None) -> StepReporter:
    """Train ``state`` on ``train`` from its start step; returns the reporter (last loss, last validation metrics,
    tokens and steps done). ``token_loss(model, batch)`` is the loss summed over a batch's trained tokens (default:
    the cross-entropy; distillation passes its divergence); ``source_loss`` replaces it for the examples of the
    named mixture sources (``replay``'s KL term)."""
    plan, device, seconds = state.plan, state.accelerator.device, state.seconds_spent
    summed = token_loss or summed_loss_of_batch
    of, names = state.sources or ((), ())
    per_source = [(source_loss or {}).get(name, summed) for name in names]

    def loss_fn(model, tagged):
        source, batch = tagged
        loss = (per_source[source] if source >= 0 else summed)(model, to_device(batch, device))
        stats = {}
        for index, name in enumerate(names):  # every source's keys on every pass: ranks all-reduce the same keys
            mine = index == source
            stats[f"loss/{name}"] = loss.detach() if mine else torch.zeros((), device=loss.device)
            stats[f"tokens/{name}"] = torch.tensor(float(trained_token_count(batch["labels"]) if mine else 0), device=loss.device)
        return loss, 0, stats

    state.model.train()
    with StepReporter(state.run_dir, plan, state.start_step, console) as reporter:
        for step in range(state.start_step, plan.total):
            started = hooks.clock()
            micro_ids, fillers = plan.micro_batches(step), plan.fillers(step)
            real = len(micro_ids) - fillers
            micro = [(source, make_batch([train[i] for i in ids], pad_id)) for source, ids in by_source(micro_ids[:real], of)]
            micro += [(-1, make_batch([train[i] for i in ids], pad_id)) for ids in micro_ids[real:]]
            set_lr(state.optimizer, lr := plan.lr(step, seconds))
            outcome = optimizer_step(state.model, state.optimizer, state.params.values(), micro, loss_fn, accelerator=state.accelerator,
                                     count=sum(trained_token_count(b["labels"]) for _, b in micro[:len(micro) - fillers]),
                                     max_grad_norm=state.max_grad_norm, fillers=fillers)
            seconds += hooks.clock() - started
            done = step + 1
            last = plan.is_last(done, seconds)
            reporter.step(done, outcome, lr=lr, last=last, input_tokens=sum(len(train[i].input_ids) for ids in micro_ids[:real] for i in ids))
            if evals and plan.eval_due(done, last):
                last = hooks.validated(state, reporter, done, validation_loss(
                    state.accelerator.unwrap_model(state.model), evals, batch_size=eval_batch_size, pad_id=pad_id, device=device,
                    autocast=state.accelerator.autocast)) or last
            if hooks.finish_step(state, reporter, outcome, done, last, seconds):
                break
    return reporter


def by_source(micro_ids: list[list[int]], of: tuple[int, ...]) -> list[tuple[int, list[int]]]:
    """Each micro-batch as (source, example ids) parts, one per source present in it (in order of first
    appearance); without sources (``of`` empty), each micro-batch whole, as source -1."""
    if not of:
        return [(-1, list(ids)) for ids in micro_ids]
    parts = []
    for ids in micro_ids:
        groups: dict[int, list[int]] = {}
        for i in ids:
            groups.setdefault(of[i], []).append(i)
        parts += list(groups.items())
    return parts
