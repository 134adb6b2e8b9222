"""Merge rules on small tensors against hand-computed results, DARE's seeding and expectation, the refusals of
models that cannot be merged, and peft's ``add_weighted_adapter`` as an oracle where its semantics match ours."""

from __future__ import annotations

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.merging import (MergeInput, check_same_family, merge_rule_names, merge_state_dicts,
                             model_family_differences)

BASE = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0])}


def model(values, weight=1.0, density=1.0, name="model"):
    return MergeInput({"w": torch.tensor(values)}, weight=weight, density=density, name=name)


def from_task(task, **kwargs):
    """A model whose task vector against BASE is ``task``."""
    return model([1.0 + t for t in task], **kwargs)


def test_every_rule_of_the_issue_is_registered():
    assert set(merge_rule_names()) >= {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"}
    with pytest.raises(TunelabError, match="unknown merge method 'soup'.*dare_ties"):
        merge_state_dicts("soup", BASE, [model([1.0] * 4)])


def test_linear_is_the_weighted_average():
    merged = merge_state_dicts("linear", None, [model([2.0, 0.0, 1.5, 1.0], weight=1), model([0.0, 3.0, 1.0, 1.25], weight=3)])
    # (1 * [2, 0, 1.5, 1] + 3 * [0, 3, 1, 1.25]) / 4 = [2, 9, 4.5, 4.75] / 4
    assert merged["w"].tolist() == [0.5, 2.25, 1.125, 1.1875]


def test_task_arithmetic_adds_lambda_times_the_weighted_task_vectors():
    models = [from_task([1.0, -1.0, 0.5, 0.0]), from_task([-1.0, 2.0, 0.0, 0.25], weight=2.0)]
    merged = merge_state_dicts("task_arithmetic", BASE, models, lambda_=0.5)
    # 1 + 0.5 * ([1, -1, 0.5, 0] + 2 * [-1, 2, 0, 0.25]) = 1 + 0.5 * [-1, 3, 0.5, 0.5]
    assert merged["w"].tolist() == [0.5, 2.5, 1.25, 1.25]


TIES_TASKS = [[3.0, -1.0, 0.5, 2.0], [-1.0, 4.0, -2.0, 0.25], [2.0, -3.0, 1.0, -0.5]]


def test_ties_trims_elects_and_averages_the_agreeing_entries():
    merged = merge_state_dicts("ties", BASE, [from_task(t, density=0.5) for t in TIES_TASKS], lambda_=0.5)
    # trimmed to the top 2 of 4 by magnitude: [3, 0, 0, 2], [0, 4, -2, 0], [2, -3, 0, 0]
    # mass [5, 1, -2, 2] elects signs [+, +, -, +]; agreeing means [(3+2)/2, 4, -2, 2] = [2.5, 4, -2, 2]
    # 1 + 0.5 * [2.5, 4, -2, 2]
    assert merged["w"].tolist() == [2.25, 3.0, 0.0, 2.0]


def test_ties_elects_by_weighted_mass_and_takes_the_weighted_mean():
    base = {"w": torch.zeros(2)}
    a = MergeInput({"w": torch.tensor([1.0, -1.0])}, weight=3.0)
    b = MergeInput({"w": torch.tensor([-3.0, 0.5])}, weight=1.0)
    merged = merge_state_dicts("ties", base, [a, b])
    # weighted: [3, -3] and [-3, 0.5]; mass [0, -2.5] elects [+ (a tie goes to +), -]; only a agrees in both:
    # entry 0: 3 * 1 / 3 = 1; entry 1: 3 * -1 / 3 = -1
    assert merged["w"].tolist() == [1.0, -1.0]


def test_dare_at_density_one_is_task_arithmetic_and_ties():
    models = [from_task(t) for t in TIES_TASKS]
    assert torch.equal(merge_state_dicts("dare_linear", BASE, models, lambda_=0.7)["w"],
                       merge_state_dicts("task_arithmetic", BASE, models, lambda_=0.7)["w"])
    assert torch.equal(merge_state_dicts("dare_ties", BASE, models)["w"], merge_state_dicts("ties", BASE, models)["w"])


def test_dare_drops_and_rescales_reproducibly_with_a_seed():
    base = {"w": torch.zeros(64)}
    task = torch.linspace(-2, 2, 64)
    models = [MergeInput({"w": task.clone()}, density=0.25)]
    first = merge_state_dicts("dare_linear", base, models, seed=7)["w"]
    assert torch.equal(first, merge_state_dicts("dare_linear", base, models, seed=7)["w"])
    assert not torch.equal(first, merge_state_dicts("dare_linear", base, models, seed=8)["w"])
    kept = first != 0
    assert torch.allclose(first[kept], task[kept] * 4)  # survivors scaled by 1 / density
    assert 4 <= int(kept.sum()) <= 32  # about a quarter of 64 survive


def test_dare_is_unbiased_in_expectation():
    base = {"w": torch.zeros(16)}
    task = torch.linspace(-1, 1, 16)
    models = [MergeInput({"w": task.clone()}, density=0.5)]
    mean = torch.stack([merge_state_dicts("dare_linear", base, models, seed=s)["w"] for s in range(1000)]).mean(0)
    # each entry's mean over n seeds has standard deviation |tau| * sqrt((1 - p) / p) / sqrt(n) = 0.032 |tau|
    assert torch.allclose(mean, task, atol=0.15 * task.abs().max())


def test_dare_keeps_tied_weights_tied():
    embed = torch.linspace(-1, 1, 12).reshape(4, 3)
    tuned = embed + 0.5
    base = {"embed.weight": embed, "lm_head.weight": embed}
    models = [MergeInput({"embed.weight": tuned, "lm_head.weight": tuned}, density=0.5)]
    merged = merge_state_dicts("dare_ties", base, models, seed=3)
    assert torch.equal(merged["embed.weight"], merged["lm_head.weight"])


def test_the_merge_keeps_the_dtype_and_leaves_the_inputs_alone():
    base = {"w": torch.ones(4, dtype=torch.bfloat16)}
    tuned = MergeInput({"w": torch.full((4,), 3.0, dtype=torch.bfloat16)})
    merged = merge_state_dicts("task_arithmetic", base, [tuned], lambda_=0.5)
    assert merged["w"].dtype == torch.bfloat16 and merged["w"].tolist() == [2.0] * 4
    assert base["w"].tolist() == [1.0] * 4 and tuned.state["w"].tolist() == [3.0] * 4


@pytest.mark.parametrize("other, message", [
    ({"v": torch.zeros(4)}, r"tuned lacks w and has extra v compared with base"),
    ({"w": torch.zeros(5)}, r"w is \(5,\) in tuned but \(4,\) in base"),
    ({"w": torch.zeros(4, dtype=torch.float16)}, r"w is torch.float16 in tuned but torch.float32 in base"),
])
def test_state_dicts_that_differ_are_refused_naming_the_difference(other, message):
    with pytest.raises(TunelabError, match=message):
        merge_state_dicts("task_arithmetic", BASE, [MergeInput(other, name="tuned")])


@pytest.mark.parametrize("kwargs, message", [
    ({"density": 0.0}, r"density 0.0; give a fraction in \(0, 1\]"),
    ({"density": 1.5}, r"density 1.5"),
])
def test_bad_densities_are_refused(kwargs, message):
    with pytest.raises(TunelabError, match=message):
        merge_state_dicts("ties", BASE, [from_task([0.0] * 4, **kwargs)])


def test_task_vector_rules_need_the_base_and_linear_needs_nonzero_weights():
    with pytest.raises(TunelabError, match="needs the base model"):
        merge_state_dicts("ties", None, [model([1.0] * 4)])
    with pytest.raises(TunelabError, match="weights sum to 0"):
        merge_state_dicts("linear", None, [model([1.0] * 4, weight=1), model([2.0] * 4, weight=-1)])


def test_models_of_another_family_are_refused_naming_what_differs(tiny_llama, tiny_qwen2):
    from transformers import AutoConfig, AutoTokenizer

    llama, qwen = AutoConfig.from_pretrained(tiny_llama), AutoConfig.from_pretrained(tiny_qwen2)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert model_family_differences(llama, tok, llama, AutoTokenizer.from_pretrained(tiny_llama)) == []
    with pytest.raises(TunelabError, match="config model_type: 'llama' vs 'qwen2'"):
        check_same_family(llama, tok, qwen, tok, names=("tiny-llama", "tiny-qwen2"))
    no_template = AutoTokenizer.from_pretrained(tiny_llama)
    no_template.chat_template = None
    no_template.add_tokens(["<extra>"])
    differences = model_family_differences(llama, tok, llama, no_template)
    assert any("vocabulary size" in d for d in differences) and any("chat template differs" in d for d in differences)


def _two_lora_adapters():
    """A linear layer with two LoRA adapters ("x", "y") of random, non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False))
    peft_model = get_peft_model(layer, LoraConfig(r=2, lora_alpha=4, target_modules=["0"]), adapter_name="x")
    peft_model.add_adapter("y", LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
    target = peft_model.base_model.model[0]
    for name in ("x", "y"):
        torch.nn.init.normal_(target.lora_A[name].weight)
        torch.nn.init.normal_(target.lora_B[name].weight)
    return peft_model, target


def _as_models(target, weights):
    """(base, models) state dicts of the full weights W and W + delta_i of each adapter."""
    w = target.base_layer.weight.detach()
    return {"w": w}, [MergeInput({"w": w + target.get_delta_weight(n).detach()}, weight=x) for n, x in zip("xy", weights)]


def test_task_arithmetic_matches_peft_cat_on_lora_deltas():
    peft_model, target = _two_lora_adapters()
    peft_model.add_weighted_adapter(["x", "y"], [0.7, 0.4], "m", combination_type="cat")
    base, models = _as_models(target, [0.7, 0.4])
    ours = merge_state_dicts("task_arithmetic", base, models)["w"] - base["w"]
    assert torch.allclose(ours, target.get_delta_weight("m").detach(), atol=1e-5)


def test_ties_matches_peft_ties_svd_at_full_rank_with_equal_weights():
    # peft elects signs on the unweighted trimmed deltas and divides the weighted sum by the number of agreeing
    # models; we elect on weighted mass and take the weighted mean. With equal weights of 1 the two coincide,
    # and an SVD of full rank (5) represents the merged delta exactly.
    peft_model, target = _two_lora_adapters()
    peft_model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "m", combination_type="ties_svd", density=0.4, svd_rank=5)
    base, models = _as_models(target, [1.0, 1.0])
    models = [MergeInput(m.state, density=0.4) for m in models]  # 0.4 * 30 = 12 entries kept, as peft's int(12.0)
    ours = merge_state_dicts("ties", base, models)["w"] - base["w"]
    assert torch.allclose(ours, target.get_delta_weight("m").detach(), atol=1e-5)


def test_peft_linear_and_ties_combine_lora_factors_not_deltas():
    # peft's "linear" (and "ties") merge the A matrices and the B matrices separately, with weights sqrt(w * scaling):
    # the product (sum_i s_i B_i)(sum_j s_j A_j) has cross terms B_i A_j, so it is not a merge of the deltas
    # B_i A_i. Our rules merge whole weights (deltas); on the factors themselves they agree with peft.
    peft_model, target = _two_lora_adapters()
    weights = [0.7, 0.4]
    peft_model.add_weighted_adapter(["x", "y"], weights, "m", combination_type="linear")
    factors = {}
    for part in ("lora_A", "lora_B"):
        scaled = [MergeInput({"f": getattr(target, part)[n].weight.detach()}, weight=(w * target.scaling[n]) ** 0.5)
                  for n, w in zip("xy", weights)]
        zero = {"f": torch.zeros_like(scaled[0].state["f"])}
        factors[part] = merge_state_dicts("task_arithmetic", zero, scaled)["f"]
        assert torch.allclose(factors[part], getattr(target, part)["m"].weight.detach(), atol=1e-6)
    base, models = _as_models(target, weights)
    delta_merge = merge_state_dicts("task_arithmetic", base, models)["w"] - base["w"]
    assert not torch.allclose(delta_merge, target.get_delta_weight("m").detach(), atol=1e-3)


def test_weights_tied_only_in_the_base_are_merged_apart():
    embed = torch.zeros(4, 3)
    base = {"embed.weight": embed, "lm_head.weight": embed}
    tuned = MergeInput({"embed.weight": torch.ones(4, 3), "lm_head.weight": torch.full((4, 3), 2.0)})
    merged = merge_state_dicts("task_arithmetic", base, [tuned])
    assert merged["embed.weight"].unique().tolist() == [1.0] and merged["lm_head.weight"].unique().tolist() == [2.0]


def test_dare_ties_matches_peft_dare_ties_svd_where_no_entry_is_dropped():
    # DARE's drops are random (peft draws them with torch.bernoulli, we with a generator seeded per tensor), so the
    # two can only be compared where nothing is dropped: at density 1 both reduce to TIES' sign election by total
    # mass and the mean of the agreeing entries, which with equal weights is the same rule in both.
    peft_model, target = _two_lora_adapters()
    peft_model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "m", combination_type="dare_ties_svd", density=1.0, svd_rank=5)
    base, models = _as_models(target, [1.0, 1.0])
    ours = merge_state_dicts("dare_ties", base, models, seed=11)["w"] - base["w"]
    assert torch.allclose(ours, target.get_delta_weight("m").detach(), atol=1e-5)
    assert (ours != 0).float().mean() > 0.5  # most entries agree with the elected sign and are kept


def test_dare_keeps_the_share_of_entries_peft_keeps():
    # The same rule by another draw: over many entries, our mask and peft's random_pruning keep about the same
    # fraction, and both rescale the survivors by 1 / density.
    from peft.utils.merge_utils import random_pruning

    task = torch.linspace(0.5, 1.5, 4000)
    ours = merge_state_dicts("dare_linear", {"w": torch.zeros(4000)}, [MergeInput({"w": task}, density=0.3)], seed=2)["w"]
    torch.manual_seed(2)
    theirs = random_pruning(task, 0.3, rescale=True)
    for merged in (ours, theirs):
        kept = merged != 0
        assert abs(float(kept.float().mean()) - 0.3) < 0.03 and torch.allclose(merged[kept], task[kept] / 0.3)
