"""Log-probabilities of completions against the naive log_softmax of the full logits: values and gradients."""

from __future__ import annotations

import pytest
import torch

from tunelab.methods import get_method
from tunelab.models.load import load_model
from tunelab.training.logprobs import sequence_logprobs, token_logprobs, token_logprobs_and_entropy


def _batch(vocab: int):
    """Right-padded rows of different lengths; labels -100 on the prompt part and on padding."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    return ids, mask, labels


def _naive(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:-1]  # prompt tuning: drop virtual tokens
    picked = torch.log_softmax(logits.float(), -1).gather(2, labels[:, 1:].clamp(min=0)[..., None]).squeeze(2)
    return picked.masked_fill(labels[:, 1:] == -100, 0.0)


def _tuned(name: str, model_dir):
    torch.manual_seed(0)
    base = load_model(str(model_dir), "float32")
    if name == "full":
        return base
    method = get_method(name)
    options = method.options_class(**({"num_virtual_tokens": 4} if name == "prompt" else {"r": 4} if name == "lora" else {}))
    model = method.apply(base, options)
    if name == "lora":  # LoRA starts as the identity (B = 0): move B so the adapters matter and get gradients
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied and tied embeddings
@pytest.mark.parametrize("name", ["lora", "full", "prompt"])
def test_logprobs_and_gradients_match_full_logits(name, arch, tiny_llama, tiny_qwen2):
    model = _tuned(name, tiny_llama if arch == "llama" else tiny_qwen2)
    ids, mask, labels = _batch(model.config.vocab_size if name == "full" else model.get_base_model().config.vocab_size)
    expected = _naive(model, ids, mask, labels)
    expected.sum().backward()
    expected_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    got = token_logprobs(model, ids, mask, labels, chunk_rows=5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got.shape == (3, 10) and bool((got[labels[:, 1:] == -100] == 0).all())
    got.sum().backward()
    grads = _grads(model)
    assert grads.keys() == expected_grads.keys() and grads
    if name == "full":
        assert any("lm_head" in n or "embed_tokens" in n for n in grads)  # the head trains
    for n in grads:
        torch.testing.assert_close(grads[n], expected_grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_chunk_size_does_not_change_results(tiny_llama):
    model = _tuned("full", tiny_llama)
    ids, mask, labels = _batch(model.config.vocab_size)
    results = []
    for rows in (1, 3, None):
        model.zero_grad(set_to_none=True)
        values = token_logprobs(model, ids, mask, labels, chunk_rows=rows)
        values.sum().backward()
        results.append((values.detach(), model.lm_head.weight.grad.clone()))
    for values, grad in results[1:]:
        torch.testing.assert_close(values, results[0][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad, results[0][1], atol=1e-6, rtol=1e-6)


def test_sequence_logprobs_sum_and_count(tiny_llama):
    model = _tuned("full", tiny_llama)
    ids, mask, labels = _batch(model.config.vocab_size)
    with torch.no_grad():
        sums, counts = sequence_logprobs(model, ids, mask, labels)
        per_token = token_logprobs(model, ids, mask, labels)
    assert counts.tolist() == [7, 4, 2]
    torch.testing.assert_close(sums, per_token.sum(1))


@pytest.mark.parametrize("name", ["lora", "prompt"])  # the chunked path and the full-logits path
def test_entropy_is_that_of_the_full_next_token_distribution(name, tiny_llama):
    model = _tuned(name, tiny_llama)
    ids, mask, labels = _batch(model.get_base_model().config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -labels.shape[1]:-1].float()
    probs = torch.softmax(logits, dim=-1)
    expected = -(probs * torch.log(probs)).sum(-1).masked_fill(labels[:, 1:] == -100, 0.0)
    logps, entropy = token_logprobs_and_entropy(model, ids, mask, labels, chunk_rows=5)
    torch.testing.assert_close(entropy, expected, atol=1e-5, rtol=1e-5)
    assert not entropy.requires_grad and logps.requires_grad
    torch.testing.assert_close(logps, token_logprobs(model, ids, mask, labels), atol=1e-6, rtol=1e-6)
