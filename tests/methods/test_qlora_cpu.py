"""QLoRA on CPU: an evaluation pass (eval mode, no grad) must not change the gradients of the next training step.

bitsandbytes repacks a 4-bit weight for its AVX512-BF16 inference kernel on the first no-grad forward in eval
mode, and that kernel has no backward; the reference here runs every 4-bit layer as ``dequantize + F.linear``.
Models are 64 wide so that every layer is one bitsandbytes would repack; qwen2 has biases on q/k/v.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("bitsandbytes")

from tunelab.methods.qlora import QLoRA, QLoraOptions  # noqa: E402
from tunelab.models.load import load_model  # noqa: E402
from tunelab.models.tiny import save_tiny_model  # noqa: E402


IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))


def _evaluate(model) -> None:
    """What an evaluation does to the model: eval mode, forward passes without grad."""
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)


def _qlora_model(directory, evaluate_base: bool = False):
    method, options = QLoRA(), QLoraOptions(r=4)
    base = load_model(str(directory), **method.base_load_kwargs(options))
    if evaluate_base:  # the recipes' untuned evaluation runs on the base, before the method is applied
        _evaluate(base)
    torch.manual_seed(0)
    model = method.apply(base, options)
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave every A without a gradient
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    return model


def _lora_grads(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


@contextlib.contextmanager
def _dequantized(model):
    """Every 4-bit layer computed as ``F.linear`` of its dequantized weight: the differentiable reference."""
    import bitsandbytes as bnb

    patched = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert patched, "the model was not loaded in 4 bit"

    def forward(module, x):
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(x.dtype)
        return F.linear(x, weight, None if module.bias is None else module.bias.to(x.dtype))

    for m in patched:
        m.forward = forward.__get__(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


@pytest.fixture(params=["llama", "qwen2"])
def wide_model(request, tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp(request.param), request.param, hidden=64)


def _assert_same_grads(grads: dict, reference: dict) -> None:
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-3, atol=1e-5, msg=name)


def test_gradients_after_an_evaluation_pass_equal_the_dequantized_reference(wide_model):
    model = _qlora_model(wide_model)
    with _dequantized(model):
        reference = _lora_grads(model, IDS)
    n_lora = sum("lora_" in n for n, _ in model.named_parameters())
    assert len(reference) == n_lora and all(g.abs().sum() > 0 for g in reference.values())
    _assert_same_grads(_lora_grads(model, IDS), reference)
    _evaluate(model)
    _assert_same_grads(_lora_grads(model, IDS), reference)


def test_evaluating_the_base_first_gives_a_fresh_models_gradients(wide_model):
    fresh = _qlora_model(wide_model)
    with _dequantized(fresh):
        reference = _lora_grads(fresh, IDS)
    _assert_same_grads(_lora_grads(_qlora_model(wide_model, evaluate_base=True), IDS), reference)


def test_a_base_repacked_before_qlora_is_applied_trains_on_the_differentiable_kernel(wide_model):
    """A base loaded outside tunelab (bitsandbytes' defaults) and evaluated has its layers repacked; apply undoes it."""
    from transformers import AutoModelForCausalLM

    method, options = QLoRA(), QLoraOptions(r=4)
    base = AutoModelForCausalLM.from_pretrained(wide_model, **method.base_load_kwargs(options))
    _evaluate(base)
    packed = [m for m in base.modules() if getattr(getattr(m, "weight", None), "quant_state", None) is not None
              and m.weight.quant_state.packing_format_for_cpu]
    if not packed:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    model = method.apply(base, options)
    with _dequantized(model):
        reference = _lora_grads(model, IDS)
    _assert_same_grads(_lora_grads(model, IDS), reference)
