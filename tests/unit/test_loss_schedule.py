import math

import torch

from tunelab.training.loss import summed_token_loss, trained_token_count
from tunelab.training.schedule import lr_at


def test_schedule_warmup_then_cosine_to_zero():
    kw = dict(base_lr=1.0, total_steps=10, warmup=2, kind="cosine")
    assert lr_at(0, **kw) == 0.5 and lr_at(1, **kw) == 1.0
    assert lr_at(2, **kw) == 1.0
    assert math.isclose(lr_at(6, **kw), 0.5, abs_tol=1e-9)
    assert lr_at(10, **kw) == 0.0
    assert lr_at(5, base_lr=1.0, total_steps=10, warmup=0, kind="linear") == 0.5
    assert lr_at(9, base_lr=3.0, total_steps=10, warmup=0, kind="constant") == 3.0


def test_token_normalised_accumulation_equals_one_big_batch():
    """Two micro-batches with different trained-token counts must give the gradient of one big batch."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11)
    x = torch.randn(4, 6, 8)
    labels = torch.randint(0, 11, (4, 6))
    labels[0, 1:5] = -100  # first example has few trained tokens
    labels[2, 3:] = -100

    head.zero_grad()
    (summed_token_loss(head(x), labels) / trained_token_count(labels)).backward()
    full = head.weight.grad.clone()

    head.zero_grad()
    parts = [(x[:1], labels[:1]), (x[1:], labels[1:])]  # unequal micro-batches on purpose
    total = sum(trained_token_count(lab) for _, lab in parts)
    for xs, lab in parts:
        (summed_token_loss(head(xs), lab) / total).backward()
    assert torch.allclose(head.weight.grad, full, atol=1e-6)

    head.zero_grad()  # the common bug: mean of per-micro-batch means differs
    for xs, lab in parts:
        (summed_token_loss(head(xs), lab) / trained_token_count(lab) / len(parts)).backward()
    assert not torch.allclose(head.weight.grad, full, atol=1e-4)
