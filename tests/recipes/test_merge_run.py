"""Folding a run into its base on tiny models: the merged directory loads with plain transformers and computes
what the tuned model did; methods that cannot be folded are refused with the reason; a failed check writes nothing."""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.evaluation.run import load_for_eval
from tunelab.merging import merge_run
from tunelab.merging import verify
from tunelab.recipes import sft

PROMPT = [{"role": "user", "content": "Colour 3?"}]
QUICK = ("eval.before=false", "eval.max_new_tokens=8")  # the tuned model is still evaluated: the card shows its score


def train(make_config, *overrides, method="lora", model=None):
    return sft.main(make_config(*QUICK, *overrides, method=method, model=model)).run_dir


def _logits_and_answer(model, tokenizer):
    from tunelab.evaluation.generate import generate_answers
    from tunelab.generation import render_prompt

    ids = torch.tensor([render_prompt(tokenizer, PROMPT)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    return logits, generate_answers(model, tokenizer, [PROMPT], max_new_tokens=8)[0]


@pytest.mark.parametrize("method, overrides", [
    ("lora", ["method.r=4"]),
    ("ia3", []),
    ("freeze", ["method.last_n_blocks=1"]),
    ("full", []),
])
def test_merged_run_loads_with_transformers_and_reproduces_the_tuned_model(make_config, tmp_path, method, overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = train(make_config, "train.max_steps=3", "train.lr=5e-2", *overrides, method=method)
    tuned = load_for_eval(str(run))
    tuned_logits, tuned_answer = _logits_and_answer(tuned.model, tuned.tokenizer)

    report = merge_run(run, tmp_path / "merged")
    out = tmp_path / "merged"
    merged = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == tuned.tokenizer.chat_template
    logits, answer = _logits_and_answer(merged, tokenizer)
    assert (logits - tuned_logits).abs().max() < 1e-4 and answer == tuned_answer

    check = report["verification"]
    assert check["passed"] and check["max_abs_logit_diff"] < 1e-3 and check["answers_agree"] == check["n_prompts"] > 0
    assert check["prompts"].startswith("data.eval")  # the run's own held examples, not the probe
    assert json.loads((out / "merge_report.json").read_text()) == report
    card = (out / "README.md").read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    assert f"`{method}`" in card and manifest["config_hash"] in card and manifest["data_hash"] in card
    assert "| tuned_score |" in card and report["eval"]["tuned_score"] == manifest["eval_summary"]["tuned_score"]
    assert not any(p.name.startswith("adapter") for p in out.iterdir())  # a plain model, no adapter files
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in out.iterdir())  # readable by others
    if method != "full":  # the tuned model differs from the base, so the check compared something
        base = AutoModelForCausalLM.from_pretrained(manifest["model"]["resolved"])
        assert (_logits_and_answer(base, tokenizer)[0] - tuned_logits).abs().max() > 1e-3


@pytest.mark.parametrize("method, reason", [
    ("prefix", "virtual tokens"),
    ("prompt", "virtual tokens"),
    ("adapter", "adds modules of its own"),
])
def test_runs_that_cannot_be_folded_are_refused_with_the_reason(make_config, tmp_path, method, reason):
    options = {"prefix": ["method.num_virtual_tokens=4"], "prompt": ["method.num_virtual_tokens=4"],
               "adapter": ["method.bottleneck=4"]}[method]
    run = train(make_config, "train.max_steps=1", *options, method=method)
    with pytest.raises(TunelabError, match=f"cannot merge .*{reason}.*Serve the adapter instead.*lora") as caught:
        merge_run(run, tmp_path / "merged")
    assert "nothing to fold" in str(caught.value) or reason == "adds modules of its own"
    assert not (tmp_path / "merged").exists()


def test_a_failed_verification_writes_nothing_unless_forced(make_config, tmp_path, monkeypatch):
    run = train(make_config, "train.max_steps=3")
    real_compare = verify.compare

    def broken_fold(reference, model, tokenizer, new_tokens, tolerance):
        with torch.no_grad():  # a fold that got one weight wrong
            model.get_output_embeddings().weight.mul_(1.5)
        return real_compare(reference, model, tokenizer, new_tokens, tolerance)

    monkeypatch.setattr("tunelab.merging.fold.compare", broken_fold)
    with pytest.raises(TunelabError, match=r"failed verification.*max \|Δ logit\|.*Nothing was written"):
        merge_run(run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))

    report = merge_run(run, tmp_path / "merged", force=True)
    assert report["forced"] and not report["verification"]["passed"]
    assert report["verification"]["max_abs_logit_diff"] > 1e-3
    assert "published with --force" in (tmp_path / "merged" / "README.md").read_text()


def test_merge_refuses_what_is_not_a_run_and_an_output_it_would_clobber(make_config, tmp_path):
    with pytest.raises(TunelabError, match="not a tunelab run directory"):
        merge_run(tmp_path, tmp_path / "merged")
    run = train(make_config, "train.max_steps=1")
    with pytest.raises(TunelabError, match="would replace the run directory"):
        merge_run(run, run)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(TunelabError, match="exists and is not an earlier merge"):
        merge_run(run, tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_a_qlora_run_is_refused_before_anything_loads(tmp_path):
    """QLoRA trained and was evaluated on a quantized base: refused from the run directory alone."""
    run = tmp_path / "qlora-run"
    (run / "adapter").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"method": "qlora", "artifact": "adapter", "model": {"resolved": "nowhere"}}))
    (run / "config.yaml").write_text("method:\n  name: qlora\n")
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}))
    with pytest.raises(TunelabError, match="cannot merge .*quantized base.*Serve the adapter instead"):
        merge_run(run, tmp_path / "merged")


def test_held_prompts_fall_back_to_the_probe_questions():
    from types import SimpleNamespace

    no_eval = SimpleNamespace(config={"data": {"train": "t.jsonl"}}, data_settings=lambda: {})
    source, conversations = verify.held_conversations(no_eval, 3)
    assert source == "built-in general probe" and len(conversations) == 3
    assert all(c[0]["role"] == "user" and c[0]["content"] for c in conversations)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied and tied embeddings
def test_a_run_whose_template_fallback_added_tokens_folds_them_in(make_config, tmp_path, request, arch):
    """The ChatML fallback added tokens: their trained embedding rows are part of the merged model."""
    from transformers import AutoModelForCausalLM

    base = request.getfixturevalue(f"tiny_base_{arch}")
    run = train(make_config, "train.max_steps=3", "train.lr=5e-2", model=base)
    tuned = load_for_eval(str(run))
    report = merge_run(run, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.get_input_embeddings().weight.shape[0] == len(tuned.tokenizer)
    assert report["verification"]["passed"]


def test_tunelab_merge_command_writes_a_verified_model_and_refuses_soft_prompts(make_config, tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app

    run = train(make_config, "train.max_steps=2")
    result = CliRunner().invoke(app, ["merge", str(run), "--out", str(tmp_path / "merged"), "--prompts", "2"])
    assert result.exit_code == 0, result.output
    assert "greedy answers equal" in result.output and (tmp_path / "merged" / "merge_report.json").is_file()
    soft = train(make_config, "train.max_steps=1", "method.num_virtual_tokens=2", f"output_dir={tmp_path / 'soft'}", method="prompt")
    refused = CliRunner().invoke(app, ["merge", str(soft), "--out", str(tmp_path / "m2")])
    assert refused.exit_code == 2 and "error:" in refused.output and not (tmp_path / "m2").exists()
