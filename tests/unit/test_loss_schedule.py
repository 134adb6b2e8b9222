import math

import pytest
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


def test_a_fractional_step_never_overshoots_the_peak_rate():
    """A time-driven schedule (train.max_seconds) asks for fractional steps, also inside the warmup."""
    kw = dict(base_lr=1.0, total_steps=30, warmup=3, kind="cosine")
    rates = [lr_at(k / 100, **kw) for k in range(0, 3001)]
    assert max(rates) == 1.0 and lr_at(2.63, **kw) == 1.0
    assert all(a <= b for a, b in zip(rates[:300], rates[1:301]))  # warmup rises monotonically


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


def _lora_model(arch: str):
    from peft import LoraConfig, get_peft_model

    from tunelab.models.tiny import build_tiny_model

    model = build_tiny_model(arch, vocab_size=320, seed=1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model


@pytest.mark.parametrize("host_index", [False, True], ids=["index-found-in-loss", "index-from-to_device"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_trained_position_logits_give_the_same_loss_and_gradients(arch, host_index):
    """The fast path (lm_head only at trained positions) must equal full logits, value and gradient,
    whether the positions come with the batch (``to_device``, no GPU sync) or are found in the loss."""
    from tunelab.training.loss import plain_causal_lm, summed_loss_of_batch, to_device

    model = _lora_model(arch)
    assert plain_causal_lm(model) is not None  # the fast path is taken
    torch.manual_seed(0)
    ids = torch.randint(0, 320, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.clone()
    labels[:, :5] = -100
    labels[mask == 0] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if host_index:
        batch = to_device(batch, "cpu")
        assert batch["trained_index"].tolist() == [t for t in range(4, 8)] + [9 + 4] + [18 + t for t in range(4, 8)]

    fast = summed_loss_of_batch(model, batch)
    fast.backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    full = summed_token_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
    full.backward()
    assert torch.allclose(fast, full, rtol=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(fast_grads[name], p.grad, atol=1e-6), name


def test_prompt_tuning_style_wrappers_use_full_logits():
    from peft import PromptTuningConfig, get_peft_model

    from tunelab.models.tiny import build_tiny_model
    from tunelab.training.loss import plain_causal_lm

    model = get_peft_model(build_tiny_model("llama", 320), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert plain_causal_lm(model) is None
