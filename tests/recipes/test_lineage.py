"""``init_from`` on tiny models: a child run starts exactly where its parent ended (continuing the artifact, or
with the parent merged into the base), records the parent in its manifest, and refuses what cannot fit."""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.evaluation.run import load_for_eval
from tunelab.recipes import sft

QUICK = ("eval.before=false", "eval.max_new_tokens=4")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def parent(make_config):
    return sft.main(make_config(*QUICK, "train.max_steps=3", output="parent")).run_dir


@pytest.mark.parametrize("merge", [False, True])
def test_child_starts_from_the_parents_result(make_config, parent, merge):
    from tunelab.stages.model import apply_method, load_base
    from tunelab.stages.setup import load_prepared_tokenizer

    config = make_config(*QUICK, f"init_from={parent}", f"init_from_merge={merge}", output="child")
    model_path, tokenizer, added = load_prepared_tokenizer(config)
    start = apply_method(config, load_base(config, model_path, tokenizer, added, "cpu"), tokenizer, added)
    ids = torch.tensor([tokenizer("Colour 3? It is").input_ids])
    expected = _logits(load_for_eval(str(parent)).model, ids)
    assert (_logits(start.model, ids) - expected).abs().max() < 1e-4
    assert start.params and all(p.requires_grad for p in start.params.values())
    if merge:  # a fresh adapter on the merged parent: its update starts at zero
        assert all("lora_B" not in n or p.abs().max() == 0 for n, p in start.params.items())


def test_a_child_on_its_merged_parent_loads_as_it_was_evaluated(make_config, parent, chat_data):
    """load_for_eval (and with it merge, export, serve) puts the child's adapter on the merged parent, not on the
    bare base: its greedy answers are eval.json's."""
    from tunelab.data import load_examples
    from tunelab.evaluation.run import evaluate

    child = sft.main(make_config(*QUICK, f"init_from={parent}", "init_from_merge=true", "train.max_steps=3", output="merged-child"))
    report = json.loads((child.run_dir / "eval.json").read_text())
    examples = load_examples([str(chat_data["eval"])])
    again = evaluate(load_for_eval(str(child.run_dir)), examples, "exact_match", max_new_tokens=4)
    assert [e["prediction"] for e in again["examples"]] == [e["prediction"] for e in report["tuned"]["examples"]]


def test_manifest_records_the_parent_and_a_changed_parent_refuses_resume(make_config, parent):
    child = sft.main(make_config(*QUICK, f"init_from={parent}", output="child")).run_dir
    manifest = json.loads((child / "manifest.json").read_text())
    recorded = manifest["parent"]
    parent_manifest = json.loads((parent / "manifest.json").read_text())
    assert recorded["run_dir"] == str(parent.resolve()) and recorded["mode"] == "continue"
    assert recorded["config_hash"] == parent_manifest["config_hash"] and recorded["data_hash"] == parent_manifest["data_hash"]
    assert len(recorded["artifact_hash"]) == 64
    weights = next((parent / "adapter").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(TunelabError, match="changed"):
        sft.main(make_config(*QUICK, f"init_from={parent}", output="child"), resume=True)


def test_init_from_refusals_name_what_to_change(make_config, parent, tmp_path):
    with pytest.raises(TunelabError, match="method.r: parent 4, here 8"):
        sft.main(make_config(*QUICK, f"init_from={parent}", "method.r=8", output="c1"))
    with pytest.raises(TunelabError, match="set method.name=lora"):
        sft.main(make_config(*QUICK, f"init_from={parent}", output="c2", method="ia3"))
    with pytest.raises(TunelabError, match="not a tunelab run"):
        sft.main(make_config(*QUICK, f"init_from={tmp_path}", output="c3"))
    with pytest.raises(TunelabError, match="needs init_from"):
        sft.main(make_config(*QUICK, "init_from_merge=true", output="c4"))
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists()
    # a fresh method on the merged parent is fine, whatever its options
    sft.main(make_config(*QUICK, f"init_from={parent}", "init_from_merge=true", "method.r=8", "train.max_steps=1", output="c5"))
