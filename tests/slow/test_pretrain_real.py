"""recipe: pretrain on the embedded SmolLM2: a folder of text files, perplexity and probe before and after."""

from __future__ import annotations

import json

import pytest

from tunelab.resolve import load_config
from tunelab.recipes import get_recipe

pytestmark = pytest.mark.slow


def test_pretrain_preset_lowers_held_out_perplexity_of_the_embedded_model(tmp_path):
    config = load_config("configs/smollm2-135m-instruct/pretrain_lora.yaml",
                         [f"output_dir={tmp_path / 'run'}", "train.epochs=2", "eval.batch_size=40"])
    result = get_recipe("pretrain").main(config)
    report = json.loads((result.run_dir / "eval.json").read_text())
    before, after = report["perplexity"]["before"]["eval_ppl"], report["perplexity"]["after"]["eval_ppl"]
    assert after < before  # the model learned the handbook's text
    assert report["forgetting"]["items"] == 40 and 0 <= report["forgetting"]["retention"] <= 1
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["recipe"] == "pretrain" and manifest["status"] == "finished"
    assert manifest["eval_summary"]["probe_retention"] == report["forgetting"]["retention"]


def test_fill_in_the_middle_on_code_teaches_the_embedded_model_its_added_tokens(tmp_path):
    """The FIM preset, shortened: SmolLM2 has no FIM tokens; after a few steps on FIM-rearranged code its
    perplexity on held-out rearranged code falls (it learns what the added tokens mean)."""
    config = load_config("configs/smollm2-135m-instruct/pretrain_fim.yaml", [
        f"output_dir={tmp_path / 'run'}", "data.train=[src/tunelab/training/schedule.py, src/tunelab/training/checkpoint.py]",
        "data.eval=src/tunelab/data/fim.py", "data.fim={rate: 1.0, spm_rate: 0.5}", "data.max_length=128",
        "train.max_steps=8", "train.lr=1e-3", "eval.probe=false"])
    result = get_recipe("pretrain").main(config)
    report = json.loads((result.run_dir / "eval.json").read_text())
    before, after = report["perplexity"]["before"]["eval_ppl"], report["perplexity"]["after"]["eval_ppl"]
    assert after < 0.8 * before
    saved = json.loads(next(result.run_dir.rglob("tokenizer.json")).read_text())
    assert {"<fim_prefix>", "<fim_suffix>", "<fim_middle>"} <= {t["content"] for t in saved["added_tokens"]}
