"""The data-chosen defaults (``tunelab.training.defaults``): the rule over plain facts, key by key."""

from __future__ import annotations

import pytest

from tunelab.training.defaults import KEYS, MAX_EPOCHS, DataFacts, choose, describe

ALL = frozenset(KEYS)


def facts(**changes) -> DataFacts:
    base = dict(examples=300, trained_tokens=15_000, hidden_size=576, method_lr=2e-4, has_rank=True)
    return DataFacts(**{**base, **changes})


def values(choices) -> dict:
    return {c.key: c.value for c in choices}


def test_three_hundred_examples_get_a_validation_slice_and_three_epochs():
    chosen = values(choose(facts(), ALL))
    assert chosen["data.validation"] == 24  # 8 % of 300
    assert chosen["train.batch_size"] == 8
    assert chosen["data.replay"] == {"path": "self", "ratio": 0.2, "kl": 1.0}
    assert chosen["train.epochs"] == 3  # 44 steps an epoch (276 task + 69 replayed, / 8) reach ~100 steps in 3
    assert chosen["train.lr"] == 5e-4 and chosen["method.r"] == 16  # LoRA's 2e-4 x 2.5 with the KL replay
    assert chosen["train.warmup_ratio"] == pytest.approx(10 / 132, abs=1e-4)
    assert chosen["train.eval_every"] == 22 and chosen["train.keep_best"] is True and chosen["train.early_stopping"] == 2


def test_few_examples_take_smaller_batches_and_no_validation_slice():
    chosen = values(choose(facts(examples=40), ALL))
    assert chosen["train.batch_size"] == 4 and chosen["train.epochs"] == MAX_EPOCHS
    assert chosen["train.warmup_ratio"] == 0.1  # 10 steps of 30 would be a third: at most a tenth
    assert not {"data.validation", "train.keep_best", "train.early_stopping", "train.eval_every", "data.replay"} & chosen.keys()


def test_many_examples_take_one_epoch_and_a_capped_slice():
    chosen = values(choose(facts(examples=20_000, trained_tokens=3_000_000), ALL))
    assert chosen["train.epochs"] == 1 and chosen["data.validation"] == 200 and "data.replay" not in chosen
    assert chosen["method.r"] == 32
    assert values(choose(facts(trained_tokens=30_000_000), ALL))["method.r"] == 64


def test_a_wider_model_takes_a_lower_rate():
    assert values(choose(facts(hidden_size=2304), ALL))["train.lr"] == pytest.approx(2.5e-4)
    assert values(choose(facts(hidden_size=None), ALL))["train.lr"] == 5e-4  # width unknown: as at the reference width


def test_keys_the_config_sets_are_not_chosen():
    chosen = values(choose(facts(batch_size=2, epochs=1), frozenset({"train.lr", "train.warmup_ratio"})))
    assert chosen.keys() == {"train.lr", "train.warmup_ratio"}
    assert chosen["train.warmup_ratio"] == pytest.approx(10 / 150, abs=1e-4)  # the config's batch 2 and 1 epoch: 150 steps


def test_a_replay_the_config_sets_lengthens_the_epoch():
    chosen = values(choose(facts(replay_ratio=0.5), ALL - {"data.replay"}))
    assert "data.replay" not in chosen and chosen["train.eval_every"] == 34  # 552 examples an epoch: 69 steps


def test_a_step_budget_leaves_the_epochs_alone():
    chosen = values(choose(facts(max_steps=400), ALL))
    assert "train.epochs" not in chosen and chosen["train.warmup_ratio"] == pytest.approx(10 / 400, abs=1e-4)


def test_methods_without_a_rank_get_none():
    assert "method.r" not in values(choose(facts(has_rank=False), ALL))


def test_every_choice_says_why():
    lines = describe(choose(facts(), ALL))
    assert len(lines) == len(KEYS) and all(len(line.split(": ", 1)[1]) > 10 for line in lines)
    assert any(line.startswith("train.epochs = 3: 44 steps an epoch") for line in lines)
    assert any(line.startswith("data.replay = {path: self, ratio: 0.2, kl: 1}: 20% of each epoch") for line in lines)


def test_the_kl_replay_raises_a_rank_methods_rate_only():
    assert values(choose(facts(has_rank=False, method_lr=5e-5), ALL))["train.lr"] == 5e-5  # full: its own rate
    plain = values(choose(facts(kl_supported=False), ALL))  # prompt tuning, or a model with soft-capped logits
    assert plain["data.replay"] == {"path": "self", "ratio": 0.2} and plain["train.lr"] == 2e-4
    assert values(choose(facts(examples=20_000), ALL))["train.lr"] == 2e-4  # no replay at all
    own = values(choose(facts(replay_ratio=0.2, replay_kl=0.3), ALL - {"data.replay"}))  # the config's KL replay
    assert own["train.lr"] == 5e-4
    assert values(choose(facts(replay_ratio=0.2), ALL - {"data.replay"}))["train.lr"] == 2e-4
