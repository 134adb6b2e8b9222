"""``recipe: grpo`` on a tiny model: the mean reward rises, a broken reward function stops the run before training
naming itself, one that hangs or exits in training fails the run naming itself, samples are written, and a
SIGKILLed run resumes to the same adapter as an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.resolve import load_config
from tunelab.errors import TunelabError
from tunelab.recipes import grpo

REPO = Path(__file__).resolve().parents[2]
REWARDS = '''
def short(completions, prompts, **fields):
    """1 for an empty answer, falling linearly to 0 at 24 characters: learnable from a random start."""
    return [max(0.0, 1.0 - len(c) / 24) for c in completions]


def some_groups_flat(completions, prompts, **fields):
    """``short`` for odd answers, 1 whatever was sampled for even ones: their groups carry no advantage."""
    return [1.0 if int(a) % 2 == 0 else max(0.0, 1.0 - len(c) / 24) for c, a in zip(completions, fields["answer"])]


def wrong_count(completions, prompts, **fields):
    return [0.0]


def _in_training(completions):
    return len(completions) > 2  # the dry run before training scores 2 completions


def hangs(completions, prompts, **fields):
    if _in_training(completions):
        import time
        time.sleep(3600)
    return [0.0] * len(completions)


def exits_0(completions, prompts, **fields):
    if _in_training(completions):
        import os
        os._exit(0)
    return [0.0] * len(completions)


def sys_exit_3(completions, prompts, **fields):
    if _in_training(completions):
        raise SystemExit(3)
    return [0.0] * len(completions)
'''


@pytest.fixture
def grpo_setup(tmp_path, tiny_llama, monkeypatch):
    (tmp_path / "grpo_test_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "grpo_test_rewards", raising=False)  # each test's own copy of the module
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Colour {i}?", "answer": str(i)}) + "\n" for i in range(8)))
    return tmp_path, prompts


def _config(tmp_path, prompts, tiny_llama, *overrides, output="grpo", reward="short"):
    return load_config(None, [f"model={tiny_llama}", "recipe.name=grpo", f"data.train={prompts}", "method.name=lora", "method.r=4",
                              "train.batch_size=4", "train.lr=5e-2", "train.max_steps=8", "train.warmup_ratio=0",
                              "recipe.max_completion_length=12", "recipe.num_generations=4", "recipe.samples_every=2",
                              "eval.probe=false", "eval.before=false", f"output_dir={tmp_path / output}", *overrides]
                       + [f"recipe.rewards=[{{fn: 'grpo_test_rewards:{reward}'}}]"])


def _logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"reward"' in line]


def test_mean_reward_rises_and_samples_are_written(grpo_setup, tiny_llama):
    tmp_path, prompts = grpo_setup
    result = grpo.main(_config(tmp_path, prompts, tiny_llama))
    logged = _logged(result.run_dir)
    assert len(logged) == 8 and {"reward", "reward_std", "zero_variance_groups", "completion_length"} <= logged[0].keys()
    first, last = sum(m["reward"] for m in logged[:3]) / 3, sum(m["reward"] for m in logged[-3:]) / 3
    assert last > first
    assert all(0 < m["entropy"] < 5.8 for m in logged) and "entropy@n" not in logged[0]  # nats, below log(320 tokens)
    samples = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "completion", "reward"} <= samples[0].keys()


def test_a_reward_returning_the_wrong_count_stops_before_training(grpo_setup, tiny_llama):
    tmp_path, prompts = grpo_setup
    config = _config(tmp_path, prompts, tiny_llama, output="bad", reward="wrong_count")
    with pytest.raises(TunelabError, match="wrong_count"):
        grpo.main(config)
    assert not (tmp_path / "bad").exists()


def _failed_without_artifact(run_dir: Path) -> bool:
    return json.loads((run_dir / "manifest.json").read_text())["status"] == "failed" and not (run_dir / "adapter").exists()


@pytest.mark.parametrize(("fn", "message"), [
    ("hangs", r"did not return within 1 s, so it was stopped; make it faster, or raise recipe.reward_timeout"),
    ("sys_exit_3", r"raised SystemExit: sys.exit\(3\) was called"),
])
def test_a_reward_that_hangs_or_exits_in_training_fails_the_run_naming_itself(grpo_setup, tiny_llama, fn, message):
    tmp_path, prompts = grpo_setup
    config = _config(tmp_path, prompts, tiny_llama, "train.max_steps=2", "recipe.reward_timeout=1", output=fn, reward=fn)
    started = time.monotonic()
    with pytest.raises(TunelabError, match=f"reward 'grpo_test_rewards:{fn}' {message}"):
        grpo.main(config)
    assert time.monotonic() - started < 60
    assert _failed_without_artifact(tmp_path / fn)


def test_os_exit_in_a_reward_exits_2_with_one_line_and_no_artifact(grpo_setup, tiny_llama):
    tmp_path, prompts = grpo_setup
    path = tmp_path / "exits.yaml"
    path.write_text(f"recipe: {{name: grpo, num_generations: 4, max_completion_length: 8, rewards: [{{fn: 'grpo_test_rewards:exits_0'}}]}}\n"
                    f"model: {tiny_llama}\nmethod: {{name: lora, r: 4}}\ndata: {{train: {prompts}}}\n"
                    f"train: {{max_steps: 2, batch_size: 2}}\neval: {{probe: false, before: false}}\noutput_dir: {tmp_path / 'exits'}\n")
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{tmp_path}"}
    done = subprocess.run([sys.executable, "-m", "tunelab", "train", str(path)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "reward 'grpo_test_rewards:exits_0' ended its process (exit status 0) instead of returning" in done.stderr
    assert "Traceback" not in done.stderr and _failed_without_artifact(tmp_path / "exits")


def test_sigkill_then_resume_is_bit_identical(grpo_setup, tiny_llama):
    tmp_path, prompts = grpo_setup

    def config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"recipe: {{name: grpo, num_generations: 4, max_completion_length: 8, rewards: [{{fn: 'grpo_test_rewards:short'}}]}}\n"
                        f"model: {tiny_llama}\nmethod: {{name: lora, r: 4}}\ndata: {{train: {prompts}}}\n"
                        "train: {max_steps: 6, batch_size: 2, grad_accum: 2, lr: 0.02, save_every: 2, seed: 3}\n"
                        f"eval: {{probe: false, before: false}}\noutput_dir: {tmp_path / name}\n")
        return path

    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{tmp_path}"}

    def cli(path: Path, *args: str, extra: dict | None = None):
        return subprocess.run([sys.executable, "-m", "tunelab", "train", str(path), *args], capture_output=True, text=True,
                              env={**env, **(extra or {})}, cwd=REPO)

    assert cli(config("straight")).returncode == 0
    assert cli(config("killed"), extra={"TUNELAB_TEST_SIGKILL_AT_STEP": "3"}).returncode == -9
    resumed = cli(config("killed"), "--resume")
    assert resumed.returncode == 0 and "Resuming from" in resumed.stderr, resumed.stderr
    a = load_file(tmp_path / "straight/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "killed/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prompts_with_tools_are_sampled_with_the_tools_rendered(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    from tunelab.data.prompts import load_prompts
    from tunelab.errors import DataError
    from tunelab.generation import SamplingSettings
    from tunelab.models.load import load_model
    from tunelab.training.rollouts import sample_rollouts

    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    path = tmp_path / "calls.jsonl"
    path.write_text(json.dumps({"prompt": "Weather in Paris?"}) + "\n" + json.dumps({"prompt": "Hi", "tools": []}) + "\n")
    (tmp_path / "calls.tools.json").write_text(json.dumps([tool]))
    prompts = load_prompts([str(path)])
    assert prompts[0].fields["tools"][0]["function"]["name"] == "get_weather" and "tools" not in prompts[1].fields
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    rollouts = sample_rollouts(load_model(tiny_llama, "float32"), tokenizer, [list(p.messages) for p in prompts], [0, 1],
                               group_size=1, settings=SamplingSettings(max_new_tokens=2), batch_size=2,
                               tools=[p.fields.get("tools") for p in prompts])
    shown = [tokenizer.decode([t for t, label in zip(r.input_ids, r.labels) if label == -100]) for r in rollouts.rows]
    assert "get_weather" in shown[0] and "Weather in Paris?" in shown[0] and "get_weather" not in shown[1]
    path.write_text(json.dumps({"prompt": "Weather?", "tools": [{"type": "function"}]}) + "\n")
    with pytest.raises(DataError, match=r"calls.jsonl:1"):
        load_prompts([str(path)])


def test_skipping_groups_without_advantage_leaves_the_update_bit_identical(grpo_setup, tiny_llama, monkeypatch):
    import tunelab.training.grpo_loop as loop

    tmp_path, prompts = grpo_setup
    trained = []
    original = loop._with_signal
    monkeypatch.setattr(loop, "_with_signal", lambda micro, settings: trained.append(len(original(micro, settings))) or
                        original(micro, settings))
    skipped = grpo.main(_config(tmp_path, prompts, tiny_llama, "train.max_steps=3", "train.batch_size=1", "train.grad_accum=4",
                                output="skipped", reward="some_groups_flat"))
    assert trained and all(1 <= n <= 2 for n in trained)  # each round: 4 prompts, the 2 even ones (at least) skipped
    monkeypatch.setattr(loop, "_with_signal", lambda micro, settings: micro)
    every = grpo.main(_config(tmp_path, prompts, tiny_llama, "train.max_steps=3", "train.batch_size=1", "train.grad_accum=4",
                              output="every", reward="some_groups_flat"))
    a = load_file(skipped.run_dir / "adapter/adapter_model.safetensors")
    b = load_file(every.run_dir / "adapter/adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
