"""Chunked linear cross-entropy: the same loss and gradients as full logits, a chunk at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunelab.training import linear_cross_entropy as lce


def _inputs(n=10, hidden=8, vocab=50, hidden_grad=True, weight_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).requires_grad_(hidden_grad)
    w = torch.randn(vocab, hidden, generator=g).requires_grad_(weight_grad)
    return h, w, torch.randint(0, vocab, (n,), generator=g)


@pytest.mark.parametrize("hidden_grad, weight_grad", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("rows", [1, 3, 10, 64])
def test_loss_and_gradients_equal_full_logits(rows, hidden_grad, weight_grad):
    h, w, t = _inputs(hidden_grad=hidden_grad, weight_grad=weight_grad)
    chunked = lce.linear_cross_entropy_sum(h, w, t, rows=rows)
    (chunked * 0.5).backward()  # the incoming gradient scales both results
    got = (h.grad, w.grad)
    h.grad = w.grad = None
    full = F.cross_entropy((h @ w.T).float(), t, reduction="sum")
    (full * 0.5).backward()
    torch.testing.assert_close(chunked, full)
    for mine, reference in zip(got, (h.grad, w.grad)):
        if reference is None:
            assert mine is None
        else:
            torch.testing.assert_close(mine, reference)


def test_without_gradients_only_the_loss_is_computed():
    h, w, t = _inputs()
    with torch.no_grad():
        value = lce.linear_cross_entropy_sum(h, w, t, rows=4)
    assert not value.requires_grad
    torch.testing.assert_close(value, F.cross_entropy(h @ w.T, t, reduction="sum"))


def test_bf16_autocast_matches_the_plain_path_under_autocast():
    h, w, t = _inputs(n=40, hidden=16, vocab=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = lce.linear_cross_entropy_sum(h, w, t, rows=7)
    chunked.backward()
    got = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy((h @ w.T).float(), t, reduction="sum")
    plain.backward()
    torch.testing.assert_close(chunked, plain, rtol=1e-3, atol=1e-3)
    assert got[0].dtype == h.dtype and got[1].dtype == w.dtype
    torch.testing.assert_close(got[0], h.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[1], w.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_training_loss_takes_the_chunked_path_with_the_same_result(monkeypatch, method):
    """Through summed_loss_of_batch: chunks of 3 positions give the full-logits loss and every gradient
    (full fine-tuning also trains the output projection)."""
    from peft import LoraConfig, get_peft_model

    from tunelab.models.tiny import build_tiny_model
    from tunelab.training.loss import summed_loss_of_batch, summed_token_loss, to_device

    model = build_tiny_model("llama", vocab_size=320, seed=3)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    torch.manual_seed(0)
    ids = torch.randint(0, 320, (3, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = to_device({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, "cpu")
    calls = []
    real = lce.linear_cross_entropy_sum
    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", 3 * 320)
    monkeypatch.setattr("tunelab.training.loss.linear_cross_entropy_sum", lambda *a, **k: calls.append(1) or real(*a, **k))

    chunked = summed_loss_of_batch(model, batch)
    chunked.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    full = summed_token_loss(model(input_ids=ids).logits, labels)
    full.backward()
    assert calls, "the chunked path was not taken"
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
