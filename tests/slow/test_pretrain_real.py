"""recipe: pretrain on the embedded SmolLM2: a folder of text files, perplexity and probe before and after."""

from __future__ import annotations

import json

import pytest

from tunelab.config import load_config
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
