"""The contract every registered tuning method keeps, checked on tiny models.

Parametrised over the whole registry, so a new method is tested the moment it registers: only its
parameters change in training; save -> load reproduces the logits; disabling it gives the base model
back (detachable methods); merging keeps the outputs (mergeable methods); batched generation with left
padding gives the same answers as one prompt at a time.
"""

from __future__ import annotations

import torch
import pytest

from tunelab.data import collate
from tunelab.data.tokenize import TokenizedExample
from tunelab.methods import get_method, method_names, trainable_parameters
from tunelab.models.load import load_model, load_tokenizer
from tunelab.training.loss import summed_loss_of_batch

# Small option values so each method is cheap on a 2-layer, 32-wide model.
TINY_OPTIONS = {
    "lora": ["method.r=4"], "qlora": ["method.r=4"], "adapter": ["method.bottleneck=8"],
    "prefix": ["method.num_virtual_tokens=4"], "prompt": ["method.num_virtual_tokens=4"],
    "freeze": ["method.last_n_blocks=1"],
}
METHODS = method_names()


def _setup(make_config, name: str, model_dir):
    config = make_config(*TINY_OPTIONS.get(name, []), method=name, model=model_dir)
    method = get_method(name)
    options = config.method
    torch.manual_seed(0)
    base = load_model(str(model_dir), "float32", **method.base_load_kwargs(options))
    return method, options, base


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (9, 12, 7):
        ids = torch.randint(5, 300, (n,), generator=g).tolist()
        examples.append(TokenizedExample(ids, [-100] * 3 + ids[3:], f"test:{n}"))
    return collate(examples, pad_id=3)


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return out[:, -batch["input_ids"].shape[1]:]  # prompt tuning prepends its virtual tokens


def _train(model, batch, steps: int = 3) -> None:
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = summed_loss_of_batch(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _frozen_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("name", METHODS)
def test_only_the_methods_parameters_change(name, make_config, tiny_llama):
    method, options, base = _setup(make_config, name, tiny_llama)
    model = method.apply(base, options)
    params = trainable_parameters(model)
    assert params, f"{name} left nothing trainable"
    frozen, before = _frozen_state(model), {n: p.detach().clone() for n, p in params.items()}
    _train(model, _batch())
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), f"{name}: frozen parameter {n} changed"
    assert any(not torch.equal(p.detach(), before[n]) for n, p in params.items()), f"{name}: no trainable parameter changed"


@pytest.mark.parametrize("name", METHODS)
def test_save_then_load_reproduces_logits(name, make_config, tiny_llama, tmp_path):
    method, options, base = _setup(make_config, name, tiny_llama)
    model = method.apply(base, options)
    batch = _batch()
    _train(model, batch)
    expected = _logits(model, batch)
    method.save(model, tmp_path / "artifact")
    if method.artifact == "model":
        reloaded = method.load(load_model(str(tiny_llama), "float32"), tmp_path / "artifact")
    else:
        _, _, fresh = _setup(make_config, name, tiny_llama)
        reloaded = method.load(fresh, tmp_path / "artifact")
    torch.testing.assert_close(_logits(reloaded, batch), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in METHODS if get_method(n).detachable])
def test_disabling_gives_the_base_model(name, make_config, tiny_llama):
    method, options, base = _setup(make_config, name, tiny_llama)
    batch = _batch()
    base_logits = _logits(base, batch)
    model = method.apply(base, options)
    _train(model, batch)
    assert not torch.allclose(_logits(model, batch), base_logits, atol=1e-4), f"{name}: training changed nothing"
    with method.disabled(model):
        torch.testing.assert_close(_logits(model, batch), base_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_merge_keeps_outputs_or_refuses(name, make_config, tiny_llama):
    from tunelab.errors import TunelabError

    method, options, base = _setup(make_config, name, tiny_llama)
    model = method.apply(base, options)
    batch = _batch()
    _train(model, batch)
    if not method.mergeable:
        with pytest.raises(TunelabError):
            method.merge(model)
        return
    expected = _logits(model, batch)
    merged = method.merge(model)
    assert not hasattr(merged, "peft_config"), f"{name}: merge left a PEFT wrapper"
    torch.testing.assert_close(_logits(merged, batch), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_batched_generation_matches_one_at_a_time(name, make_config, tiny_llama):
    method, options, base = _setup(make_config, name, tiny_llama)
    model = method.apply(base, options)
    _train(model, _batch())
    model.eval()
    tokenizer = load_tokenizer(str(tiny_llama))
    tokenizer.padding_side = "left"
    prompts = ["Colour 3?", "What colour is the sky at noon in summer?", "Hi"]

    def generate(texts):
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=True)
        return [row.tolist() for row in out[:, enc["input_ids"].shape[1]:]]

    together = generate(prompts)
    alone = [generate([p])[0] for p in prompts]
    assert together == alone


@pytest.mark.parametrize("name", sorted(n for n in METHODS if get_method(n).incompatible))
def test_incompatible_features_are_refused_before_loading(name, make_config):
    from tunelab.errors import TunelabError
    from tunelab.recipes.sft import check_method_fits

    for feature in get_method(name).incompatible:
        config = make_config(*TINY_OPTIONS.get(name, []), f"train.{feature}=true", method=name)
        with pytest.raises(TunelabError, match=f"train.{feature}"):
            check_method_fits(config)
