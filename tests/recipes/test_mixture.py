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
from tunelab.resolve import load_config
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


def test_the_kls_untuned_model_is_the_lora_model_switched_off(make_config, sources, tiny_llama):
    """A method that starts at the base keeps no copy: its KL toward the untuned model, with the method switched off,
    equals (value and gradient) the KL toward a frozen copy of the base, once the adapter has moved; full keeps a copy."""
    import copy
    import io

    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM


    from tunelab.methods import get_method
    from tunelab.stages.replay import replay_kl_loss
    from tunelab.training.distill import distill_loss_sum
    from tunelab.training.loss import to_device

    replay = f"data.replay={{path: {sources['g']}, ratio: 0.5, kl: 0.7}}"
    config, said = make_config(replay), io.StringIO()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    frozen = copy.deepcopy(base).eval()
    loss = replay_kl_loss(config, base, lambda model: model, Console(file=said))["replay"]
    assert "switched off: no copy" in said.getvalue()
    tuned = get_method(config.method.name).apply(base, config.method).train()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(3, 300, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = to_device({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, "cpu")

    def grads(value) -> dict:
        value.backward()
        found = {n: p.grad.clone() for n, p in tuned.named_parameters() if p.requires_grad}
        tuned.zero_grad()
        return found

    live, reference = loss(tuned, batch), distill_loss_sum(tuned, frozen, batch, kind="forward_kl", alpha=0.3)
    assert float(live) == pytest.approx(float(reference), rel=1e-5) and float(live) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads(live).values(), grads(reference).values()))
    assert tuned.training  # switched back on, in training mode

    full, said = make_config(replay, method="full"), io.StringIO()
    replay_kl_loss(full, AutoModelForCausalLM.from_pretrained(tiny_llama), lambda model: model, Console(file=said))
    assert "a frozen copy" in said.getvalue()


def test_the_kl_is_refused_up_front_for_a_method_that_changes_the_inputs(make_config, sources):
    from tunelab.methods import get_method, method_names
    from tunelab.stages.model import check_method_fits

    changes = next(name for name in method_names() if getattr(get_method(name), "changes_inputs", False))
    config = make_config(f"data.replay={{path: {sources['g']}, ratio: 0.5, kl: 0.5}}", method=changes)
    with pytest.raises(TunelabError, match="data.replay.kl"):
        check_method_fits(config)
    check_method_fits(make_config(f"data.replay={{path: {sources['g']}, ratio: 0.5}}", method=changes))


def test_the_kl_is_refused_before_training_for_a_model_whose_logits_are_not_the_heads(make_config, sources):
    """A model type off the plain-head list (Gemma 3) is refused when the model loads, not at the first replayed batch."""
    import io

    from rich.console import Console
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from tunelab.stages.replay import replay_kl_loss

    gemma = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=320, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    config = make_config(f"data.replay={{path: {sources['g']}, ratio: 0.5, kl: 0.5}}")
    with pytest.raises(TunelabError, match="gemma3_text.*data.replay.kl=0"):
        replay_kl_loss(config, gemma, lambda model: model, Console(file=io.StringIO()))
