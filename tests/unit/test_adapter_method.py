"""Houlsby bottleneck adapters: exact start, frozen base, save/load, bypass, generation, checkpointing."""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.methods.adapter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterOptions,
    HoulsbyAdapter,
    adapter_modules,
    adapter_parameter_count,
    is_adapter_dir,
)
from tunelab.methods.base import TuningMethod, count_parameters, get_method, trainable_parameters
from tunelab.models.tiny import build_tiny_model, build_tiny_tokenizer

ARCHS = ["llama", "qwen2"]
METHOD = HoulsbyAdapter()


def _batch(vocab: int = 320, seed: int = 1, rows: int = 2, length: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, length), generator=g)  # (rows, length)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits  # (rows, length, vocab)


def _train(model, steps: int = 3, lr: float = 1e-2) -> None:
    params = list(trainable_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=lr)
    ids = _batch(seed=5, rows=4, length=9)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_registered_with_protocol_attributes():
    method = get_method("adapter")
    assert isinstance(method, HoulsbyAdapter) and isinstance(method, TuningMethod)
    assert (method.artifact, method.mergeable, method.detachable, method.incompatible) == ("adapter", False, True, frozenset())
    assert method.options_class is AdapterOptions
    with pytest.raises(Exception):
        AdapterOptions(bottleneck=8, rank=4)  # extra keys are refused


@pytest.mark.parametrize("arch", ARCHS)
def test_step0_equals_base_exactly(arch):
    base = build_tiny_model(arch)
    ids = _batch()
    expected = _logits(base, ids)
    model = METHOD.apply(base, AdapterOptions(bottleneck=8))
    assert model is base
    assert torch.equal(_logits(model, ids), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_targets_and_parameter_count(arch):
    hidden, layers, m = 32, 2, 8
    model = METHOD.apply(build_tiny_model(arch, hidden=hidden, layers=layers), AdapterOptions(bottleneck=m))
    names = sorted(adapter_modules(model))
    assert names == sorted(f"model.layers.{i}.{sub}.adapter" for i in range(layers) for sub in ("self_attn.o_proj", "mlp.down_proj"))
    trainable, _ = count_parameters(model)
    # biases on both projections: per adapter 2*d*m + m + d, one after attention and one after the MLP
    assert trainable == 2 * layers * (2 * hidden * m + m + hidden) == 2 * layers * adapter_parameter_count(hidden, m)


@pytest.mark.parametrize("arch", ARCHS)
def test_only_adapters_train(arch):
    model = METHOD.apply(build_tiny_model(arch), AdapterOptions(bottleneck=8))
    trainable = trainable_parameters(model)
    assert trainable and all(".adapter." in name for name in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(trainable)  # every adapter tensor moved, nothing else did


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_roundtrip_and_disabled(arch, tmp_path):
    ids = _batch()
    base_logits = _logits(build_tiny_model(arch), ids)
    model = METHOD.apply(build_tiny_model(arch), AdapterOptions(bottleneck=8, nonlinearity="silu"))
    _train(model)
    tuned = _logits(model, ids)
    assert not torch.allclose(tuned, base_logits)
    with METHOD.disabled(model):
        assert torch.equal(_logits(model, ids), base_logits)
    assert torch.equal(_logits(model, ids), tuned)  # restored

    METHOD.save(model, tmp_path / "adapter")
    assert is_adapter_dir(tmp_path / "adapter") and not is_adapter_dir(tmp_path)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    saved = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())
    assert saved["method"] == "adapter" and saved["options"]["bottleneck"] == 8 and saved["options"]["nonlinearity"] == "silu"

    from safetensors.torch import load_file

    assert all(".adapter." in k for k in load_file(tmp_path / "adapter" / WEIGHTS_FILE))
    loaded = METHOD.load(build_tiny_model(arch), tmp_path / "adapter")
    torch.testing.assert_close(_logits(loaded, ids), tuned, atol=1e-6, rtol=0)


def test_disabled_restores_on_exception():
    model = METHOD.apply(build_tiny_model("llama"), AdapterOptions(bottleneck=4))
    with pytest.raises(RuntimeError):
        with METHOD.disabled(model):
            assert not any(a.enabled for a in adapter_modules(model).values())
            raise RuntimeError("boom")
    assert all(a.enabled for a in adapter_modules(model).values())


def test_merge_refuses():
    model = METHOD.apply(build_tiny_model("llama"), AdapterOptions(bottleneck=4))
    with pytest.raises(TunelabError, match="cannot be merged"):
        METHOD.merge(model)


def test_bad_targets_and_double_apply():
    with pytest.raises(TunelabError, match="matches no module"):
        METHOD.apply(build_tiny_model("llama"), AdapterOptions(target_modules=["nope_proj"]))
    with pytest.raises(TunelabError, match="not a linear layer"):
        METHOD.apply(build_tiny_model("llama"), AdapterOptions(target_modules=["mlp"]))
    model = METHOD.apply(build_tiny_model("llama"), AdapterOptions(bottleneck=4, target_modules=["mlp.down_proj"]))
    assert len(adapter_modules(model)) == 2
    with pytest.raises(TunelabError, match="already has"):
        METHOD.apply(model, AdapterOptions(bottleneck=4))


def test_auto_targets_nothing_found():
    tiny = torch.nn.Sequential(torch.nn.Embedding(4, 4))
    with pytest.raises(TunelabError, match="target_modules"):
        METHOD.apply(tiny, AdapterOptions())


def test_load_rejects_mismatches(tmp_path):
    model = METHOD.apply(build_tiny_model("llama"), AdapterOptions(bottleneck=4))
    METHOD.save(model, tmp_path / "a")
    with pytest.raises(TunelabError, match=WEIGHTS_FILE):  # different hidden size
        METHOD.load(build_tiny_model("llama", hidden=48), tmp_path / "a")
    with pytest.raises(TunelabError, match=WEIGHTS_FILE):  # different depth: unexpected tensors
        METHOD.load(build_tiny_model("llama", layers=1), tmp_path / "a")
    with pytest.raises(TunelabError, match=CONFIG_FILE):
        METHOD.load(build_tiny_model("llama"), tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_left_padded_batch(arch):
    tok = build_tiny_tokenizer()
    tok.padding_side = "left"
    base = build_tiny_model(arch, vocab_size=len(tok))
    base.generation_config.pad_token_id = tok.pad_token_id
    model = METHOD.apply(base, AdapterOptions(bottleneck=8))
    _train(model, lr=5e-2)
    model.eval()
    prompts = ["The quick brown fox", "Hi"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        together = model.generate(**batch, **kwargs)
        for i, prompt in enumerate(prompts):  # each row alone gives the same continuation
            single = tok([prompt], return_tensors="pt")
            alone = model.generate(**single, **kwargs)
            assert together[i, batch["input_ids"].shape[1]:].tolist() == alone[0, single["input_ids"].shape[1]:].tolist()
        no_cache = model.generate(**batch, **{**kwargs, "use_cache": False})
    assert torch.equal(together, no_cache)


def test_gradient_checkpointing_and_resized_embeddings():
    ids = _batch(vocab=320, seed=5, rows=4, length=9)
    grads = []
    for checkpointing in (False, True):
        model = build_tiny_model("qwen2", seed=3)
        model.resize_token_embeddings(336)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)
        model = METHOD.apply(model, AdapterOptions(bottleneck=8))
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({k: p.grad.clone() for k, p in trainable_parameters(model).items()})
    assert grads[0].keys() == grads[1].keys()
    assert any(g.abs().sum() > 0 for g in grads[1].values())
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k])
