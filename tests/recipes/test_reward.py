"""``recipe: reward`` on a tiny model: held-out pairwise accuracy rises above chance, the saved reward model scores
from Python (``tunelab.rewards.load``) as it did in training, and only reward runs load as reward models."""

from __future__ import annotations

import json

import pytest
from test_dpo import pair_records, write_jsonl  # noqa: F401 - the same pairs as the DPO tests

from tunelab import rewards
from tunelab.resolve import load_config
from tunelab.errors import TunelabError
from tunelab.recipes import reward, sft


@pytest.fixture
def reward_run(tmp_path, tiny_llama):
    train = write_jsonl(tmp_path / "pairs.jsonl", pair_records(16))
    held = write_jsonl(tmp_path / "held.jsonl", pair_records(6, start=50))
    config = load_config(None, [f"model={tiny_llama}", "recipe=reward", f"data.train={train}", f"data.eval={held}",
                                "method.name=lora", "method.r=4", "train.batch_size=4", "train.lr=5e-2", "train.max_steps=8",
                                "train.warmup_ratio=0", f"output_dir={tmp_path / 'rm'}"])
    return reward.main(config)


def test_reward_model_learns_the_preference_and_scores_from_python(reward_run):
    report = json.loads((reward_run.run_dir / "eval.json").read_text())["reward"]
    assert report["after"]["eval_accuracy"] > 0.5 and report["after"]["eval_accuracy"] >= report["before"]["eval_accuracy"]
    assert report["after"]["eval_pair_loss"] < report["before"]["eval_pair_loss"]
    assert (reward_run.artifact_dir / "reward_head.safetensors").is_file()

    rm = rewards.load(reward_run.run_dir)
    held = pair_records(6, start=50)
    chosen = rm.score([p["prompt"] for p in held], [p["chosen"] for p in held])
    rejected = rm.score([[{"role": "user", "content": p["prompt"]}] for p in held], [p["rejected"] for p in held])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(held)
    assert accuracy == pytest.approx(report["after"]["eval_accuracy"])
    with pytest.raises(TunelabError, match="one completion per prompt"):
        rm.score(["a", "b"], ["x"])


def test_only_reward_runs_load_as_reward_models(make_config):
    run = sft.main(make_config("eval.before=false", "eval.max_new_tokens=4", "train.max_steps=1")).run_dir
    with pytest.raises(TunelabError, match="not a `recipe: reward` run"):
        rewards.load(run)
