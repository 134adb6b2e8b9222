"""Distillation divergences against TRL's GKD loss (the oracle), and the chunked student/teacher loss against the
plain full-logits computation, value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunelab.training.distill import distill_loss_sum, divergence
from tunelab.training.loss import to_device


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_equals_trl(beta, temperature):
    pytest.importorskip("trl")
    from trl.experimental.gkd import GKDTrainer

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, dtype=torch.float64), torch.randn(2, 5, 11, dtype=torch.float64)
    ours = divergence(student.reshape(10, 11), teacher.reshape(10, 11), "jsd", beta=beta, temperature=temperature).sum()
    theirs = GKDTrainer.generalized_jsd_loss(student.float(), teacher.float(), beta=beta, temperature=temperature, reduction="sum")
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5, abs=1e-6)


def test_forward_and_reverse_kl_are_the_textbook_formulas():
    torch.manual_seed(1)
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    assert torch.allclose(divergence(s, t, "forward_kl"), F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1), atol=1e-6)
    assert torch.allclose(divergence(s, t, "reverse_kl"), F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1), atol=1e-6)
    assert torch.allclose(divergence(s, s, "jsd"), torch.zeros(4), atol=1e-6)


@pytest.mark.parametrize("kind, alpha", [("forward_kl", 0.0), ("jsd", 0.0), ("reverse_kl", 0.5)])
def test_chunked_loss_equals_full_logits_and_its_gradient(tiny_llama, kind, alpha):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(tiny_llama)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(3, 300, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 7:] = -100
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    batch = to_device({"input_ids": ids, "attention_mask": mask, "labels": labels}, "cpu")

    loss = distill_loss_sum(student, teacher, batch, kind=kind, beta=0.4, temperature=1.5, alpha=alpha, chunk_rows=3)
    loss.backward()
    chunked = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()

    s_logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    keep = labels[:, 1:] != -100
    full = (1 - alpha) * divergence(s_logits[keep], t_logits[keep], kind, beta=0.4, temperature=1.5).sum()
    full = full + alpha * F.cross_entropy(s_logits[keep], labels[:, 1:][keep], reduction="sum")
    full.backward()
    assert float(loss) == pytest.approx(float(full), rel=1e-5)
    for name, p in student.named_parameters():
        assert torch.allclose(chunked[name], p.grad, atol=1e-6), name
    assert all(p.grad is None for p in teacher.parameters())
