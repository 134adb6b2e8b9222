"""The data-chosen defaults applied to a run: printed, recorded in config.yaml and the manifest, the validation
slice held out of the train data (never data.eval, never a replayed example), chosen again by each compare candidate."""

from __future__ import annotations

import json

import yaml
from rich.console import Console

from tests.conftest import chat_records, write_jsonl
from tunelab.compare.sweep import candidate_tree
from tunelab.resolve import load_config
from tunelab.recipes import sft
from tunelab.stages.defaults import unset_keys
from tunelab.stages.setup import read_examples, split_validation


def _config(tmp_path, tiny_llama, *overrides):
    train = write_jsonl(tmp_path / "train.jsonl", chat_records(120))
    held = write_jsonl(tmp_path / "eval.jsonl", chat_records(6, seed=3))
    return load_config(None, [f"model={tiny_llama}", f"data.train={train}", f"data.eval={held}", "eval.probe=false",
                              f"output_dir={tmp_path / 'run'}", "train.max_steps=3", *overrides])


def test_unset_keys_are_chosen_printed_and_recorded(tmp_path, tiny_llama, capsys):
    config = _config(tmp_path, tiny_llama, "train.batch_size=4", "data.replay=null")  # replay: the test below
    result = sft.main(config)
    err = " ".join(capsys.readouterr().err.split())
    assert "Defaults from the data (120 examples" in err and "data.validation = 16" in err
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    chosen = manifest["defaults_chosen"]
    assert not {"train.batch_size", "train.epochs", "data.replay"} & chosen.keys()  # set (max_steps: a budget)
    assert chosen["train.lr"]["value"] == 2e-4 and chosen["method.r"]["value"] == 16 and chosen["train.keep_best"]["value"]
    resolved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert resolved["data"]["validation"] == 16 and resolved["train"]["early_stopping"] == 2
    assert resolved["train"]["batch_size"] == 4 and resolved["method"]["r"] == 16
    report = json.loads((result.run_dir / "eval.json").read_text())
    assert len(report["tuned"]["examples"]) == 6  # the task is still scored on data.eval, not the validation slice
    assert "120 train" not in err and "104 train / 16 held-out validation examples" in err


def test_fixed_defaults_choose_nothing(tmp_path, tiny_llama):
    config = _config(tmp_path, tiny_llama, "train.defaults=fixed")
    assert unset_keys(config) == frozenset()
    assert unset_keys(_config(tmp_path, tiny_llama, "train.lr=1e-4", "method.r=4")).isdisjoint({"train.lr", "method.r"})


def test_the_validation_slice_never_holds_out_a_replayed_example(tmp_path, tiny_llama):
    general = write_jsonl(tmp_path / "general.jsonl", chat_records(40, seed=5))
    config = _config(tmp_path, tiny_llama, "data.validation=10", f"data.replay={{path: {general}, ratio: 0.2}}")
    examples = read_examples(config)
    assert len(examples.validation) == 10 and all("general.jsonl" not in e.source for e in examples.validation)
    assert len(examples.train) == 150 and len(examples.eval) == 6  # 110 task + 40 replay; data.eval is the task's
    assert split_validation(config, examples) is examples  # held out once


def test_compare_candidates_choose_their_own_defaults(tmp_path, tiny_llama):
    config = _config(tmp_path, tiny_llama)
    full = candidate_tree(config, "full", tmp_path / "f", tmp_path / "b.json")
    assert "lr" not in full["train"] and "epochs" not in full["train"] and "validation" not in full["data"]
    assert full["train"]["max_steps"] == 3  # what the config set stays


def test_the_compare_report_states_the_budget_each_candidate_chose(tmp_path, tiny_llama):
    from tunelab.compare.sweep import _budget

    config = load_config(None, [f"model={tiny_llama}", "data.train=t.jsonl"])
    for name, lr in (("lora", 2e-4), ("full", 5e-5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": 3, "batch_size": 8, "lr": lr, "max_steps": None}}))
    stated = _budget(config, tmp_path, ["lora", "full", "ia3"])  # ia3: not trained yet
    assert stated == ("chosen from the data by each candidate: lora 3 epoch(s) of batch 8 at lr 0.0002; full 3 epoch(s) of batch 8 "
                      "at lr 5e-05; same examples and order (seed 0)")
    fixed = load_config(None, [f"model={tiny_llama}", "data.train=t.jsonl", "train.defaults=fixed"])
    assert _budget(fixed, tmp_path, ["lora"]).startswith("same for every trained candidate: 1 epoch(s), batch")


def test_self_replay_is_the_untuned_models_own_answers_made_once(tmp_path, tiny_llama, monkeypatch):
    from tunelab.datagen import generate as datagen
    from tunelab.stages import replay

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(replay, "MAX_NEW_TOKENS", 6)
    real = datagen.generate_sft  # a random tiny model never ends an answer: keep the cut-off ones here
    monkeypatch.setattr(datagen, "generate_sft", lambda *a, **k: real(*a, **{**k, "keep_truncated": True}))
    config = _config(tmp_path, tiny_llama, "data.replay={path: self, ratio: 0.2}", "train.defaults=fixed")
    console = Console(stderr=True)
    resolved = replay.resolve_self_replay(config, console)
    assert config.data.replay.path == "self"  # the resolved description is frozen: a new one has the path
    config = resolved
    made = list((tmp_path / "cache" / "replay").glob("*.jsonl"))
    assert [config.data.replay.path] == [str(p) for p in made]
    records = [json.loads(line) for line in made[0].read_text().splitlines()]
    assert len(records) == 58 and records[0]["meta"]["teacher"]["resolved"] == str(tiny_llama)
    monkeypatch.setattr(datagen, "generate_sft", None)  # a second run reads the cache, generating nothing
    again = _config(tmp_path, tiny_llama, "data.replay={path: self, ratio: 0.2}", "train.defaults=fixed")
    again = replay.resolve_self_replay(again, console)
    assert again.data.replay.path == str(made[0])
    result = sft.main(again)
    assert "replay" in (result.run_dir / "config.yaml").read_text()


def test_the_rule_chooses_self_replay_from_a_hundred_examples(tmp_path, tiny_llama, monkeypatch):
    from tunelab.datagen import generate as datagen
    from tunelab.stages import replay
    from tunelab.stages.defaults import choose_defaults
    from tunelab.stages.setup import load_prepared_tokenizer

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(replay, "MAX_NEW_TOKENS", 6)
    real = datagen.generate_sft
    monkeypatch.setattr(datagen, "generate_sft", lambda *a, **k: real(*a, **{**k, "keep_truncated": True}))
    config = _config(tmp_path, tiny_llama)
    model_path, tokenizer, _ = load_prepared_tokenizer(config)
    config, examples, chosen = choose_defaults(config, read_examples(config), tokenizer, model_path, Console(stderr=True))
    assert {"path": "self", "ratio": 0.2, "kl": 1.0} in [c.value for c in chosen] and config.data.replay.kl == 1.0
    assert next(c.value for c in chosen if c.key == "train.lr") == 5e-4  # LoRA's rate x 2.5 with the KL replay
    assert config.data.replay.path.startswith(str(tmp_path / "cache" / "replay"))
    replayed = [e for e in examples.train if e.source.startswith(config.data.replay.path)]
    assert len(replayed) == 58 and len(examples.train) == 104 + 58 and len(examples.validation) == 16
