"""Keep the best, not the last (``train.keep_best``), stop when validation stops improving
(``train.early_stopping``), and a validation slice held out of the train data (``data.validation``)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tunelab.resolve import load_config
from tunelab.errors import ConfigError
from tunelab.recipes import sft
from tunelab.stages.setup import read_examples
from tunelab.training import token_loop
from tunelab.training.best import BestKeeper


def test_the_keeper_saves_improvements_stops_after_patience_and_resumes_its_history(tmp_path):
    p = {"w": torch.nn.Parameter(torch.zeros(3))}
    keeper = BestKeeper.open(tmp_path, patience=2, keep=True, start_step=0)
    for step, loss in [(1, 3.0), (2, 2.0), (3, 2.5)]:
        p["w"].data.fill_(step)
        assert not keeper.update(step, {"eval_loss": loss}, p)
    assert keeper.best == (2, 2.0) and keeper.since_best() == 1
    assert keeper.update(4, {"eval_loss": 2.0}, p) and keeper.stopped  # equal is no improvement: 2 in a row
    assert keeper.record() == {"validations": 4, "best_step": 2, "best_eval_loss": 2.0, "stopped_by": "early_stopping"}
    assert keeper.restore(p) == 2 and p["w"].tolist() == [2.0, 2.0, 2.0]  # step 2's weights, not the last step's

    resumed = BestKeeper.open(tmp_path, patience=2, keep=True, start_step=3)  # a checkpoint at step 3: step 4 runs again
    assert resumed.history == [(1, 3.0), (2, 2.0), (3, 2.5)] and not resumed.stopped
    assert BestKeeper.open(tmp_path, patience=2, keep=True, start_step=4).stopped  # stopped before the crash: stays so
    early = BestKeeper.open(tmp_path, patience=2, keep=True, start_step=1)  # the saved weights are step 2's, not kept
    assert early.best == (1, 3.0) and early.restore(p) is None
    assert not keeper.update(5, {"eval_loss": float("nan")}, p)  # no comparison with NaN


def test_sft_stops_early_and_its_artifact_is_the_best_step(make_config, monkeypatch):
    script = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0])  # the validation losses of steps 1, 2, 3, ...
    monkeypatch.setattr(token_loop, "validation_loss", lambda *a, **k: {"eval_loss": next(script)})
    cfg = make_config("train.max_steps=8", "train.eval_every=1", "train.save_every=1", "train.keep_last=10",
                      "train.early_stopping=2", "train.keep_best=true", "eval.before=false")
    result = sft.main(cfg)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["steps_done"] == 4 and manifest["stopped_by"] == "early_stopping"
    assert manifest["best_step"] == 2 and manifest["validations"] == 4
    at_step = {s: load_file(result.run_dir / f"checkpoints/step-{s:08d}/trainable.safetensors") for s in (2, 4)}
    adapter = {k.replace(".weight", ".default.weight"): v for k, v in load_file(result.artifact_dir / "adapter_model.safetensors").items()}
    assert adapter.keys() == at_step[2].keys()
    assert all(torch.equal(adapter[k], at_step[2][k]) for k in adapter)  # the best step's weights ...
    assert not all(torch.equal(adapter[k], at_step[4][k]) for k in adapter)  # ... not the last step's


def test_validation_holds_out_a_slice_of_the_train_data(make_config):
    cfg = make_config("data.eval=null", "data.validation=0.25", "train.max_steps=2")
    result = sft.main(cfg)
    report = json.loads((result.run_dir / "eval.json").read_text())
    held = {e["source"] for e in report["tuned"]["examples"]}
    assert len(held) == 6  # a quarter of the 24 train examples (file:line of each)
    examples = read_examples(cfg)
    assert {e.source for e in examples.eval} == held  # the same slice every time (train.seed) ...
    assert len(examples.train) == 18 and not held & {e.source for e in examples.train}  # ... never trained on


@pytest.mark.parametrize("overrides, message", [
    (["train.keep_best=true"], "train.keep_best need validation data"),
    (["train.early_stopping=2", "data.validation=1.5"], "data.validation: 1.5 is a share"),
])
def test_validation_settings_are_checked(tmp_path, overrides, message):
    data = tmp_path / "train.jsonl"
    data.write_text("")
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"data.train={data}", *overrides])
