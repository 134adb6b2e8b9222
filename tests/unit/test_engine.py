"""The shared training components: step plan, optimizer step, step reporter."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from tunelab.training.device import make_accelerator
from tunelab.training.optim import StepOutcome, optimizer_step
from tunelab.training.plan import StepPlan
from tunelab.training.reporter import StepReporter
from tunelab.training.schedule import epoch_batches, lr_at, steps_per_epoch, total_steps


def _plan(**overrides) -> StepPlan:
    options = dict(batch_size=3, grad_accum=2, epochs=2, max_steps=None, seed=7, lr=1e-3, schedule="linear",
                   warmup_ratio=0.0)
    options.update(overrides)
    return StepPlan.build(20, **options)


def test_step_plan_walks_each_epochs_shuffle_in_accumulated_micro_batches():
    plan = _plan()
    assert plan.per_epoch == steps_per_epoch(20, 3, 2) == 4 and plan.total == total_steps(
        20, batch_size=3, grad_accum=2, epochs=2, max_steps=None) == 8
    for epoch in range(2):
        order = epoch_batches(20, 3, 7, epoch)
        walked = [ids for step in range(epoch * 4, epoch * 4 + 4) for ids in plan.micro_batches(step)]
        assert walked == order  # every micro-batch of the epoch, in the epoch's order, once
    assert plan.save_every == 4 and plan.eval_every == 4 and plan.log_every == 1
    assert _plan(on_gpu=True).log_every == 10 and _plan(max_steps=3).total == 3


def test_step_plan_learning_rate_follows_steps_or_the_time_budget():
    plan = _plan()
    assert [plan.lr(s) for s in range(8)] == [lr_at(s, base_lr=1e-3, total_steps=8, warmup=0, kind="linear") for s in range(8)]
    timed = _plan(max_seconds=100.0)
    assert timed.lr(1, seconds_spent=50.0) == pytest.approx(lr_at(4.0, base_lr=1e-3, total_steps=8, warmup=0, kind="linear"))
    assert timed.is_last(2, seconds_spent=100.0) and not timed.is_last(2, seconds_spent=99.0) and plan.is_last(8, 0.0)


def _linear_problem():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    data = [(torch.randn(n, 4), torch.randn(n, 1)) for n in (1, 5)]  # micro-batches of unequal size
    return model, data


def _summed_squares(model, batch):
    x, y = batch
    loss = ((model(x) - y) ** 2).sum()
    return loss, x.shape[0], {"rows_seen": torch.tensor(float(x.shape[0]))}


def test_optimizer_step_normalises_by_the_whole_steps_count_not_per_micro_batch():
    """Two unequal micro-batches give the gradient of one big batch (sum / total rows), not a mean of means."""
    model, data = _linear_problem()
    accelerator = make_accelerator("fp32")
    big = torch.nn.Linear(4, 1, bias=False)
    big.weight.data.copy_(model.weight.data)
    x, y = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
    (((big(x) - y) ** 2).sum() / 6).backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = model.weight.detach().clone()
    outcome = optimizer_step(model, optimizer, list(model.parameters()), data, _summed_squares, count=6,
                             accelerator=accelerator, max_grad_norm=None)
    assert torch.allclose(before - model.weight.detach(), big.weight.grad, atol=1e-6)
    assert outcome.count == 6 and float(outcome.stats["rows_seen"]) == 6.0
    assert float(outcome.loss_sum) == pytest.approx(float(((big(x) - y) ** 2).sum()), rel=1e-5)


def test_reporter_logs_the_recipes_extra_stats_per_unit_and_only_on_logged_steps(tmp_path):
    plan = _plan(log_every=2)
    with StepReporter(tmp_path, plan, 0, Console(file=open(tmp_path / "out.txt", "w"))) as reporter:
        for done in (1, 2):
            outcome = StepOutcome(torch.tensor(12.0), 4, None, {"reward": torch.tensor(2.0)})
            reporter.step(done, outcome, lr=1e-3, input_tokens=10, last=False)
        reporter.evaluation(2, {"eval_loss": 1.5, "eval_ppl": 4.48})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 2]
    assert records[0]["loss"] == 3.0 and records[0]["reward"] == 0.5 and records[1]["eval_loss"] == 1.5
    assert reporter.done == 2 and reporter.tokens_total == 20 and reporter.last_loss == 3.0
