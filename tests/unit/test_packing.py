"""Padding-free packing: grouping, boundaries, and losses/gradients equal to the unpacked examples."""

from __future__ import annotations

import pytest
import torch

from tunelab.data import IGNORE_INDEX, TokenizedExample, collate
from tunelab.data.packing import (
    check_packed_attention,
    collate_packed,
    collate_packed_rows,
    pack_examples,
    packed_micro_batch,
    row_budget,
)
from tunelab.errors import TunelabError
from tunelab.training.loss import summed_loss_of_batch, summed_token_loss, trained_token_count

VOCAB = 320


def _examples(lengths: list[int], seed: int = 0) -> list[TokenizedExample]:
    """Random examples whose first half (the "prompt") is untrained."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX if t < n // 2 else tok for t, tok in enumerate(ids)]
        out.append(TokenizedExample(ids, labels, f"ex:{i}"))
    return out


def _segments(position_ids: torch.Tensor) -> torch.Tensor:
    """Segment index of every position of a row (a new segment starts wherever the position is 0)."""
    return (position_ids == 0).long().cumsum(-1)


# ------------------------------------------------------------------------------- grouping


def test_pack_examples_is_greedy_in_order_and_respects_the_budget():
    examples = _examples([5, 4, 3, 9, 2, 2, 6])
    rows = pack_examples(examples, max_tokens=10)
    assert rows == [[0, 1], [2], [3], [4, 5, 6]]
    assert [i for row in rows for i in row] == list(range(len(examples)))  # given order kept
    for row in rows:
        assert sum(len(examples[i].input_ids) for i in row) <= 10
    assert pack_examples(examples, max_tokens=10) == rows  # deterministic
    assert pack_examples([], max_tokens=10) == []


def test_an_over_long_example_gets_its_own_row():
    examples = _examples([3, 25, 4, 4])
    rows = pack_examples(examples, max_tokens=8)
    assert rows == [[0], [1], [2, 3]]
    with pytest.raises(TunelabError, match="positive"):
        pack_examples(examples, max_tokens=0)


def test_rows_no_longer_than_the_longest_example_never_cost_more_than_padding():
    """Token slots and attention work (sum of squared row lengths) stay at or below the padded batch's."""
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        lengths = torch.randint(1, 60, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        examples = _examples(lengths)
        width, batch = max(lengths), len(lengths)
        row_lengths = [sum(lengths[i] for i in row) for row in pack_examples(examples, row_budget(examples, "sdpa"))]
        assert max(row_lengths) == width and len(row_lengths) <= batch
        assert len(row_lengths) * max(row_lengths) <= batch * width
        assert sum(r * r for r in row_lengths) <= batch * width * width
    assert row_budget(_examples([3, 9]), "flash_attention_2") is None  # varlen kernels: one row


# ------------------------------------------------------------------------------- collation


def test_collate_packed_makes_one_row_with_restarting_positions_and_no_mask():
    examples = _examples([4, 6, 3])
    batch = collate_packed(examples, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, 13)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert batch["input_ids"][0].tolist() == sum((ex.input_ids for ex in examples), [])
    expected = []
    for ex in examples:
        expected += [IGNORE_INDEX] + ex.labels[1:]
    assert batch["labels"][0].tolist() == expected


def test_labels_never_cross_an_example_boundary():
    examples = _examples([5, 1, 7, 2, 9], seed=3)
    for ex in examples:  # train everything, so only the boundary rule can mask a position
        ex.labels = list(ex.input_ids)
    for batch in (collate_packed(examples, 0), collate_packed_rows([examples[:2], examples[2:]], 0)):
        seg = _segments(batch["position_ids"])
        trained = batch["labels"][:, 1:] != IGNORE_INDEX  # position t predicts labels[t+1]
        assert (seg[:, :-1] == seg[:, 1:])[trained].all()
        # and every within-example target is still trained: only the boundaries were masked
        assert trained.sum() == sum(len(ex.input_ids) - 1 for ex in examples)


def test_several_rows_are_right_padded_and_padding_is_its_own_sequence():
    examples = _examples([4, 3, 6])
    batch = collate_packed_rows([examples[:2], examples[2:]], pad_id=7)
    assert batch["input_ids"].shape == (2, 7)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0]]
    assert batch["input_ids"][1, 6] == 7 and batch["labels"][1, 6] == IGNORE_INDEX
    assert packed_micro_batch(examples, 7, max_tokens=8)["input_ids"].shape == (2, 7)
    assert packed_micro_batch(examples, 7)["input_ids"].shape == (1, 13)


def test_attention_implementations_that_cannot_separate_examples_are_refused():
    class Config:
        _attn_implementation = "sdpa"

    class Model:
        config = Config()

    assert check_packed_attention(Model(), rows=4) == "sdpa"
    Config._attn_implementation = "flash_attention_2"
    assert check_packed_attention(Model(), rows=1) == "flash_attention_2"
    with pytest.raises(TunelabError, match="one row per batch"):
        check_packed_attention(Model(), rows=2)
    Config._attn_implementation = "some_custom_kernel"
    with pytest.raises(TunelabError, match="train.packing=false"):
        check_packed_attention(Model())


# ------------------------------------------------------------------------------- equivalence


def _lora_model(arch: str, attn: str):
    from peft import LoraConfig, get_peft_model

    from tunelab.models.tiny import build_tiny_model

    model = build_tiny_model(arch, vocab_size=VOCAB, seed=1)
    model.set_attn_implementation(attn)
    assert model.config.use_cache  # the default: the loss must still switch the KV cache off for packing
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def _loss_and_grads(model, batches: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    total = torch.zeros(())
    for batch in batches:
        loss = summed_loss_of_batch(model, batch)
        loss.backward()
        total = total + loss.detach()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return total, grads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_loss_and_gradients_equal_the_unpacked_examples(arch, attn):
    torch.manual_seed(0)
    model = _lora_model(arch, attn)
    examples = _examples([9, 4, 13, 6, 11, 5], seed=1)
    examples[2].labels = list(examples[2].input_ids)  # fully trained (loss_on=all): its first token is a label

    alone, alone_grads = _loss_and_grads(model, [collate([ex], pad_id=0) for ex in examples])
    padded, _ = _loss_and_grads(model, [collate(examples, pad_id=0)])
    one_row = collate_packed(examples, pad_id=0)
    packed, packed_grads = _loss_and_grads(model, [one_row])
    rows, rows_grads = _loss_and_grads(model, [packed_micro_batch(examples, pad_id=0, max_tokens=20)])

    assert trained_token_count(one_row["labels"]) == sum(trained_token_count(collate([ex], 0)["labels"]) for ex in examples)
    for value in (padded, packed, rows):
        assert torch.allclose(value, alone, rtol=1e-4, atol=1e-4), (value, alone)
    for grads in (packed_grads, rows_grads):
        for name, grad in alone_grads.items():
            assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-5), name


def test_packed_examples_do_not_see_each_other():
    """Changing one example's tokens changes no other example's logits in the packed row."""
    from tunelab.models.tiny import build_tiny_model

    model = build_tiny_model("llama", vocab_size=VOCAB, seed=2).eval()
    examples = _examples([6, 8])
    batch = collate_packed(examples, 0)
    changed = batch["input_ids"].clone()
    changed[0, :6] = (changed[0, :6] + 1) % VOCAB
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        b = model(input_ids=changed, position_ids=batch["position_ids"], use_cache=False).logits
    assert torch.allclose(a[0, 6:], b[0, 6:], atol=1e-6)
    assert not torch.allclose(a[0, :6], b[0, :6], atol=1e-3)


# ------------------------------------------------------------------------------- loss paths


def _padded_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_ia3_takes_the_exact_trained_position_path():
    from peft import IA3Config, get_peft_model

    from tunelab.models.tiny import build_tiny_model
    from tunelab.training.loss import plain_causal_lm

    model = get_peft_model(build_tiny_model("llama", VOCAB, seed=1), IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    assert plain_causal_lm(model) is not None
    batch = _padded_batch()
    fast, fast_grads = _loss_and_grads(model, [batch])
    model.zero_grad()
    full = summed_token_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    full.backward()
    assert torch.allclose(fast, full.detach(), rtol=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(fast_grads[name], p.grad, atol=1e-6), name


def _prompt_tuned(num_virtual_tokens: int = 3):
    from peft import PromptTuningConfig, get_peft_model

    from tunelab.models.tiny import build_tiny_model

    return get_peft_model(build_tiny_model("llama", VOCAB, seed=1),
                          PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens))


def test_prompt_tuning_loss_drops_the_virtual_token_logits():
    model = _prompt_tuned(3)
    batch = _padded_batch()
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    loss = summed_loss_of_batch(model, batch)

    with torch.no_grad():  # by hand: soft prompt in front, then the real tokens; score only the real ones
        base = model.get_base_model()
        prompts = model.get_prompt(batch_size=ids.shape[0])  # (B, P, H)
        embeds = torch.cat([prompts, base.get_input_embeddings()(ids)], dim=1)
        full_mask = torch.cat([torch.ones(ids.shape[0], 3, dtype=mask.dtype), mask], dim=1)
        logits = base(inputs_embeds=embeds, attention_mask=full_mask).logits[:, 3:]  # (B, T, V)
        logp = torch.log_softmax(logits.float(), dim=-1)
        expected = torch.zeros(())
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1] - 1):
                if labels[b, t + 1] != IGNORE_INDEX:
                    expected -= logp[b, t, labels[b, t + 1]]
        # and peft's own mean loss over the same tokens
        peft_mean = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.allclose(loss.detach(), expected, rtol=1e-5)
    assert torch.allclose(loss.detach() / trained_token_count(labels), peft_mean, rtol=1e-5)


def test_prompt_tuning_refuses_packed_batches():
    model = _prompt_tuned(2)
    with pytest.raises(TunelabError, match="train.packing=false"):
        summed_loss_of_batch(model, collate_packed(_examples([4, 5]), pad_id=0))
