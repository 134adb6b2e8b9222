"""Weighted training mixtures and replay (``data.train: [{path, weight}]``, ``data.replay``): each epoch draws
each source's share, deterministically from (seed, epoch), so a killed and resumed run ends bit-identical."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import chat_records, write_jsonl
from tunelab.config import load_config
from tunelab.errors import ConfigError, TunelabError
from tunelab.recipes import dpo, sft
from tunelab.training.schedule import mixture_batches, mixture_counts

REPO = Path(__file__).resolve().parents[2]


def test_each_source_gives_its_share_of_an_epoch():
    assert mixture_counts(25, (3.0, 1.0, 1.0)) == [15, 5, 5]
    assert sum(mixture_counts(7, (1.0, 1.0, 1.0))) == 7
    sizes = (12, 8, 30)
    batches = mixture_batches(sizes, (3.0, 1.0, 1.0), 25, 4, seed=0, epoch=0)
    flat = [i for b in batches for i in b]
    source = Counter(0 if i < 12 else 1 if i < 20 else 2 for i in flat)
    assert source == {0: 15, 1: 5, 2: 5} and len(flat) == 25
    assert Counter(i for i in flat if i < 12).most_common(1)[0][1] == 2  # 15 of 12 examples: each once, 3 twice
    assert mixture_batches(sizes, (3.0, 1.0, 1.0), 25, 4, seed=0, epoch=0) == batches  # a function of (seed, epoch)
    assert mixture_batches(sizes, (3.0, 1.0, 1.0), 25, 4, seed=0, epoch=1) != batches


def test_mixture_keys_are_validated():
    with pytest.raises(ConfigError, match="weight"):
        load_config(None, ["data.train=[{path: a.jsonl, weight: 0}]"])
    with pytest.raises(ConfigError, match="ratio"):
        load_config(None, ["data.train=a.jsonl", "data.replay={path: g.jsonl, ratio: 1.5}"])
    config = load_config(None, ["data.train=[{path: a.jsonl, weight: 2, name: task}, b.jsonl]", "data.replay={path: g.jsonl}"])
    assert config.data.train_files() == ["a.jsonl", "b.jsonl", "g.jsonl"]  # all hashed, all validated
    assert config.data.mixture() == [("a.jsonl", "task", 2.0), ("b.jsonl", "b", 1.0), ("g.jsonl", "replay", 3.0 * 0.1 / 0.9)]


@pytest.fixture
def sources(tmp_path) -> dict[str, Path]:
    return {"a": write_jsonl(tmp_path / "a.jsonl", chat_records(12)), "b": write_jsonl(tmp_path / "b.jsonl", chat_records(8, seed=2)),
            "g": write_jsonl(tmp_path / "general.jsonl", chat_records(30, seed=4))}


def _overrides(sources, out: Path) -> list[str]:
    return [f"data.train=[{{path: {sources['a']}, weight: 3}}, {sources['b']}]", f"data.replay={{path: {sources['g']}, ratio: 0.2}}",
            f"output_dir={out}"]


def test_a_mixture_trains_the_epoch_it_describes_and_resumes_bit_identically(make_config, sources, tmp_path, tiny_llama):
    config = tmp_path / "mix.yaml"
    config.write_text(f"model: {tiny_llama}\nmethod: {{name: lora, r: 4}}\ndata: {{train: x}}\n"
                      "train: {batch_size: 2, max_steps: 8, save_every: 4, lr: 1.0e-2, warmup_ratio: 0}\neval: {probe: false}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    args = [sys.executable, "-m", "tunelab", "train", str(config), *_overrides(sources, tmp_path / "killed")]
    crashed = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env={**env, "TUNELAB_TEST_SIGKILL_AT_STEP": "6"})
    assert crashed.returncode == -9
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, cwd=REPO, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Training mixture: a 12 x 3, b 8 x 1, replay 30 x 1 -> 25 examples an epoch" in " ".join(resumed.stderr.split())
    straight = sft.main(make_config(*_overrides(sources, tmp_path / "again"), "train.max_steps=8", "train.batch_size=2",
                                    "train.save_every=4", "train.lr=1e-2"))
    assert straight.steps == 8
    one = load_file(straight.artifact_dir / "adapter_model.safetensors")
    two = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert all((one[k] == two[k]).all() for k in one)


def test_recipes_that_read_files_concatenated_refuse_weights(tmp_path, tiny_llama, sources):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Q{i}?", "chosen": "yes.", "rejected": "no!"} for i in range(6)])
    config = load_config(None, [f"model={tiny_llama}", "recipe.name=dpo", f"data.train=[{{path: {pairs}, weight: 2}}]",
                                f"output_dir={tmp_path / 'dpo'}", "method.name=lora", "method.r=4", "train.max_steps=2",
                                "eval.probe=false", "eval.before=false"])
    with pytest.raises(TunelabError, match="apply to recipe sft"):
        dpo.main(config)


def test_general_replay_is_the_shipped_set_and_shares_no_probe_question():
    import json

    from tunelab.config.schema import GENERAL_REPLAY
    from tunelab.data import load_examples

    config = load_config(None, ["data.train=a.jsonl", "data.replay={path: general, ratio: 0.2}"])
    assert config.data.replay.path == str(GENERAL_REPLAY)
    examples = load_examples([str(GENERAL_REPLAY)])
    assert len(examples) >= 40
    probe = {json.loads(line)["question"].lower() for line in
             (REPO / "src/tunelab/evaluation/probes/general.jsonl").read_text().splitlines()}
    assert not {e.messages[0]["content"].lower() for e in examples} & probe


def test_each_source_logs_its_own_loss(make_config, sources, tmp_path):
    import json

    done = sft.main(make_config(*_overrides(sources, tmp_path / "run"), "train.max_steps=4", "train.batch_size=4", "train.lr=1e-2"))
    steps = [r for r in map(json.loads, (done.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r and "step" in r]
    assert len(steps) == 4
    names = ("a", "b", "replay")
    for record in steps:
        tokens = {n: record[f"tokens/{n}"] for n in names}
        assert sum(tokens.values()) == record["trained_tokens"]
        present = [n for n in names if tokens[n]]
        assert all(f"loss/{n}" in record for n in present) and all(f"loss/{n}" not in record for n in names if n not in present)
        mixed = sum(record[f"loss/{n}"] * tokens[n] for n in present) / record["trained_tokens"]
        assert mixed == pytest.approx(record["loss"], rel=1e-5)  # the sources' losses make up the step's loss
    assert any(len([n for n in names if r[f"tokens/{n}"]]) > 1 for r in steps)  # micro-batches that mix sources were split


def test_replay_kl_pulls_the_replayed_answers_toward_the_untuned_model(make_config, sources, tmp_path):
    """kl 1: the replayed examples' loss is the KL from the untuned model alone, 0 at the first step (LoRA starts at
    the untuned model) and above 0 once the task has moved the model; the task's sources keep their cross-entropy."""
    import json

    def steps(kl: float, name: str) -> list[dict]:
        over = [f"data.train=[{sources['a']}]", f"data.replay={{path: {sources['g']}, ratio: 0.5, kl: {kl}}}",
                f"output_dir={tmp_path / name}", "train.max_steps=4", "train.batch_size=8", "train.lr=5e-2", "eval.before=false"]
        done = sft.main(make_config(*over))
        return [r for r in map(json.loads, (done.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r and "step" in r]

    kl, ce = steps(1.0, "kl"), steps(0.0, "ce")
    assert kl[0]["tokens/replay"] and kl[0]["loss/replay"] == pytest.approx(0.0, abs=1e-5)
    assert ce[0]["loss/replay"] > 1.0  # the same first batch scored by cross-entropy
    assert kl[0]["loss/a"] == pytest.approx(ce[0]["loss/a"], rel=1e-5)  # the task's loss is the same
    assert max(r["loss/replay"] for r in kl[1:] if r["tokens/replay"]) > 1e-3  # the task moved the model; KL pulls back
