"""The forgetting probe a model can answer: chat questions for a model that ships a chat template, the same facts
as text to continue for a base model that does not (``eval.probe: true``)."""

from __future__ import annotations

import json

from tunelab.evaluation.report import load_probe, probe_answers
from tunelab.evaluation.run import LoadedModel
from tunelab.models.load import load_tokenizer
from tunelab.recipes import sft
from tunelab.stages.evaluation import probe_spec


def test_a_base_model_gets_the_completion_probe(make_config, tiny_llama, tiny_base_llama):
    assert probe_spec(make_config("eval.probe=true")) is True  # tiny_llama ships a chat template
    assert probe_spec(make_config("eval.probe=true", model=tiny_base_llama)) == "completion"
    assert probe_spec(make_config("eval.probe=general", model=tiny_base_llama)) == "general"  # asked for: kept


def test_continuations_are_cut_at_the_first_line(tiny_base_llama):
    from transformers import AutoModelForCausalLM

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_base_llama), load_tokenizer(str(tiny_base_llama))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    items = load_probe("completion")[:4]
    answers = probe_answers(LoadedModel(model, tokenizer, "base"), items, batch_size=4)
    assert [a["question"] for a in answers] == [i["prompt"] for i in items]
    assert all("\n" not in a["answer"] for a in answers)


def test_a_base_model_run_reports_the_completion_probe(make_config, tiny_base_llama):
    result = sft.main(make_config("eval.probe=true", "train.max_steps=1", model=tiny_base_llama))
    report = json.loads((result.run_dir / "eval.json").read_text())
    prompts = {i["prompt"] for i in load_probe("completion")}
    assert report["forgetting"]["items"] == 40 and {r["question"] for r in report["forgetting"]["before"]} == prompts
