"""What the matrix relies on, checked directly on tiny models: LoRA's reach into MoE experts (and not the
router), ``method.experts``, the planner's MoE parameter counts, and IA3's targets found in the model."""

from __future__ import annotations

import pytest

from tunelab.errors import TunelabError
from tunelab.methods import count_parameters, get_method, trainable_parameters
from tunelab.methods.lora import LoraOptions, check_experts
from tunelab.models.anatomy import ia3_targets
from tunelab.models.tiny import save_tiny_of_type

from architectures.archs import ARCHITECTURES, MOE


def _tiny(tmp_path, model_type: str):
    from transformers import AutoModelForCausalLM

    folder = save_tiny_of_type(tmp_path / model_type, model_type, **ARCHITECTURES[model_type][1])
    return folder, AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("model_type, experts", [(m, None) for m in sorted(MOE)] + [("qwen3_moe", False), ("gpt_oss", False)])
def test_lora_trains_the_experts_unless_told_not_to_and_never_the_router(tmp_path, model_type, experts):
    _, model = _tiny(tmp_path, model_type)
    tuned = get_method("lora").apply(model, LoraOptions(r=4, experts=experts))
    names = list(trainable_parameters(tuned))
    assert any(".mlp.experts." in n for n in names) == (experts is None)
    assert any(".self_attn.o_proj.lora_A" in n for n in names)
    assert not any(".mlp.gate." in n or ".mlp.router." in n for n in names)  # the routers


def test_experts_on_a_dense_model_and_dora_on_experts_are_refused(tmp_path):
    from transformers import AutoConfig

    dense = AutoConfig.for_model("llama")
    with pytest.raises(TunelabError, match="has no experts"):
        check_experts(LoraOptions(experts=True), dense)
    check_experts(LoraOptions(use_dora=True), dense)
    moe = AutoConfig.for_model("mixtral")
    with pytest.raises(TunelabError, match="no DoRA for fused expert weights"):
        check_experts(LoraOptions(use_dora=True), moe)
    check_experts(LoraOptions(use_dora=True, experts=False), moe)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_plan_counts_moe_parameters_exactly_and_the_active_ones(tmp_path, model_type):
    from transformers import AutoConfig

    from tunelab.planning import ModelShape

    folder, model = _tiny(tmp_path, model_type)
    shape = ModelShape.from_config(AutoConfig.from_pretrained(folder))
    assert sum(shape.parameter_table().values()) == count_parameters(model)[1]
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert shape.active_parameters() == count_parameters(model)[1] - experts // 2  # 2 of 4 experts per token


@pytest.mark.parametrize("model_type, targets, feedforward", [
    ("llama", ["mlp.down_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.down_proj"]),
    ("phi3", ["mlp.down_proj", "self_attn.qkv_proj"], ["mlp.down_proj"]),  # fused q/k/v, fused gate/up
    ("lfm2", ["feed_forward.w2", "self_attn.k_proj", "self_attn.v_proj"], ["feed_forward.w2"]),  # conv layers: none
    ("gpt_oss", ["self_attn.k_proj", "self_attn.v_proj"], []),  # experts are fused weights, not linear layers
])
def test_ia3_targets_are_found_in_the_model(tmp_path, model_type, targets, feedforward):
    _, model = _tiny(tmp_path, model_type)
    assert ia3_targets(model) == (targets, feedforward)
