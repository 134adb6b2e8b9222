"""The loop of the recipes whose objective is the token-summed cross-entropy (``sft``, ``pretrain``).

Recipes with other objectives (preference pairs, sampled completions) write their own short loop over the
same components: :class:`~tunelab.training.plan.StepPlan` for steps and learning rates,
:func:`~tunelab.training.optim.optimizer_step` for accumulation/clipping/stepping,
:class:`~tunelab.training.reporter.StepReporter` for logging, ``stages.optimize.save_state`` for checkpoints.
``max_seconds`` ends the loop early: time is counted over optimizer steps only (not validation or
checkpoints), summed over resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from tunelab.data import TokenizedExample
from tunelab.training import hooks
from tunelab.training.loss import summed_loss_of_batch, to_device, trained_token_count
from tunelab.training.optim import optimizer_step, set_lr
from tunelab.training.reporter import StepReporter
from tunelab.training.validation import validation_loss



def run_token_loss(opt, train: list[TokenizedExample], evals: list[TokenizedExample], *, pad_id: int,
                   make_batch: Callable, run_dir: Path, console: Console, eval_batch_size: int, keep_last: int,
                   max_grad_norm: float | None, save_state: Callable, token_loss: Callable | None = None) -> StepReporter:
    """Train ``opt`` (a ``stages.optimize.Optimization``) on ``train`` from its start step; returns the reporter
    (last loss, last validation metrics, tokens and steps done). ``token_loss(model, batch)`` is the loss summed
    over a batch's trained tokens (default: the cross-entropy; distillation passes its divergence)."""
    plan, device, seconds = opt.plan, opt.accelerator.device, opt.seconds_spent
    summed = token_loss or summed_loss_of_batch

    def loss_fn(model, batch):
        return summed(model, to_device(batch, device)), 0, {}

    opt.model.train()
    with StepReporter(run_dir, plan, opt.start_step, console) as reporter:
        for step in range(opt.start_step, plan.total):
            started = hooks.clock()
            micro_ids, fillers = plan.micro_batches(step), plan.fillers(step)
            micro = [make_batch([train[i] for i in ids], pad_id) for ids in micro_ids]
            real = len(micro) - fillers
            set_lr(opt.optimizer, lr := plan.lr(step, seconds))
            outcome = optimizer_step(opt.model, opt.optimizer, opt.params.values(), micro, loss_fn, accelerator=opt.accelerator,
                                     count=sum(trained_token_count(b["labels"]) for b in micro[:real]),
                                     max_grad_norm=max_grad_norm, fillers=fillers)
            seconds += hooks.clock() - started
            done = step + 1
            last = plan.is_last(done, seconds)
            reporter.step(done, outcome, lr=lr, last=last, input_tokens=sum(len(train[i].input_ids) for ids in micro_ids[:real] for i in ids))
            if evals and plan.eval_due(done, last):
                reporter.evaluation(done, validation_loss(opt.accelerator.unwrap_model(opt.model), evals, batch_size=eval_batch_size, pad_id=pad_id,
                                                          device=device, autocast=opt.accelerator.autocast))
            if hooks.finish_step(opt, reporter, outcome, done, last, seconds, run_dir=run_dir, keep_last=keep_last,
                                 save_state=save_state):
                break
    return reporter

