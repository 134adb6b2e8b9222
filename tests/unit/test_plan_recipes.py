"""``tunelab plan`` counts what a recipe adds: both sides of every pair, a distillation teacher's weights."""

from __future__ import annotations

from tunelab.resolve import load_config
from tunelab.planning import plan


def _config(tiny_llama, tmp_path, *overrides):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 8)
    return load_config(None, [f"model={tiny_llama}", f"data.train={data}", "train.batch_size=4", "data.max_length=64",
                              "method.name=lora", "method.r=4", *overrides])


def test_pairs_double_the_rows_and_the_time(tiny_llama, tmp_path):
    sft, dpo = plan(_config(tiny_llama, tmp_path), "h100-80gb"), plan(_config(tiny_llama, tmp_path, "recipe=dpo"), "h100-80gb")
    assert dpo.batch[0] == 2 * sft.batch[0] and dpo.memory.activations > sft.memory.activations
    assert dpo.time.seconds == 2 * sft.time.seconds
    assert any("both sides of each pair" in note for note in dpo.assumptions)


def test_a_teacher_adds_its_weights(tiny_llama, tmp_path):
    sft = plan(_config(tiny_llama, tmp_path), "h100-80gb")
    distill = plan(_config(tiny_llama, tmp_path, "recipe.name=distill", f"recipe.teacher={tiny_llama}"), "h100-80gb")
    params = sum(sft.shape.parameter_table().values())
    assert distill.memory.weights - sft.memory.weights >= 4 * params
    assert distill.memory.total > sft.memory.total and any("teacher" in note for note in distill.assumptions)
