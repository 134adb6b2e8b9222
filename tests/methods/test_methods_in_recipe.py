"""Every registered method through the whole recipe: train -> artifact -> eval.json -> reload by run dir."""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.evaluation.run import evaluate, load_for_eval
from tunelab.methods import method_names
from tunelab.recipes import sft
from tunelab.stages.setup import read_examples

from .test_contract import TINY_OPTIONS


@pytest.mark.parametrize("name", method_names())
def test_method_trains_saves_and_reloads_through_the_recipe(name, make_config):
    config = make_config(*TINY_OPTIONS.get(name, []), "train.max_steps=2", "eval.max_new_tokens=4", method=name)
    result = sft.main(config)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["method"] == name
    assert 0 < manifest["trainable_parameters"] <= manifest["total_parameters"]
    assert manifest["artifact_mb"] > 0 and manifest["tokens_per_s"] > 0 and manifest["peak_memory_mb"] > 0
    report = json.loads((result.run_dir / "eval.json").read_text())
    predictions = [row["prediction"] for row in report["tuned"]["examples"]]
    assert len(predictions) == 6

    # The run directory alone reproduces the tuned model: same answers as the in-process evaluation.
    loaded = load_for_eval(str(result.run_dir))
    again = evaluate(loaded, read_examples(config).eval, config.eval.metric, max_new_tokens=4, batch_size=config.eval.batch_size)
    assert [row["prediction"] for row in again["examples"]] == predictions


def test_method_without_token_training_refuses_added_chat_tokens(make_config, tmp_path):
    from tunelab.errors import TunelabError
    from tunelab.models.tiny import save_tiny_model

    plain = save_tiny_model(tmp_path / "no-template", chat_template=None, chatml_tokens=False)
    with pytest.raises(TunelabError, match="cannot train them"):
        sft.main(make_config("method.num_virtual_tokens=4", method="prompt", model=plain))


def test_prompt_tuning_loss_ignores_the_virtual_tokens(make_config, tiny_llama):
    """The loss of a prompt-tuned model is taken on the real tokens only, aligned with the labels."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.training.loss import summed_loss_of_batch, summed_token_loss

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([[-100, -100, 7, 8, 9]])}
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, 3:]
    torch.testing.assert_close(summed_loss_of_batch(model, batch), summed_token_loss(logits, batch["labels"]))
