"""Agentic GRPO (``recipe.environment``) on a tiny model: tool output carries no loss weight, a 2-step run with a
Python-tools environment trains and writes whole episodes, a broken environment is refused by name with nothing
saved, and the new options are validated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.errors import TunelabError
from tunelab.generation import Completion
from tunelab.recipes import grpo
from tunelab.recipes.options import GrpoOptions
from tunelab.resolve import load_config
from tunelab.rewards.environment import EnvironmentClient, tool_schema
from tunelab.training.episodes import EpisodeSampler

REPO = Path(__file__).resolve().parents[2]

ENVS = '''
from tunelab.rewards.environment import ToolEnvironment


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


class Forced(ToolEnvironment):
    """Works with a random model: the opening already holds a call and its result, and reward counts turns."""

    functions = {"add": add}

    def reset(self, record, seed=None):
        return record["messages"]

    def reward(self, episode):
        return float(episode["turns"])


class Seeded(ToolEnvironment):
    """State drawn from the reset seed (a number added to the prompt); the reward depends on it and on the answer."""

    functions = {"add": add}

    def reset(self, record, seed=None):
        import random
        self.offset = random.Random(seed).randint(0, 9)
        return [{"role": "user", "content": f"{record['messages'][-1]['content']} Add {self.offset}."}]

    def reward(self, episode):
        return float((len(episode["messages"][-1]["content"]) + self.offset) % 5)


class Raises(ToolEnvironment):
    functions = {"add": add}

    def reset(self, record):
        raise RuntimeError("no database")


class Hangs(ToolEnvironment):
    functions = {"add": add}

    def reset(self, record):
        import time
        time.sleep(3600)


class BadTypes(ToolEnvironment):
    functions = {"add": add}

    def reset(self, record):
        return "not messages"


class BadStep(ToolEnvironment):
    functions = {"add": add}

    def step(self, tool_calls):
        return [42 for _ in tool_calls]
'''
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


@pytest.fixture
def envs(tmp_path, monkeypatch):
    (tmp_path / "agentic_envs.py").write_text(ENVS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "agentic_envs", raising=False)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + 3?", "answer": str(i + 3)}) + "\n" for i in range(4)))
    return tmp_path, prompts


def test_tool_schema_from_a_signature():
    def lookup(city: str, days: int = 1) -> str:
        """Weather of a city.

        More text."""
    schema = tool_schema(lookup)["function"]
    assert schema["name"] == "lookup" and schema["description"] == "Weather of a city."
    assert schema["parameters"]["properties"] == {"city": {"type": "string"}, "days": {"type": "integer"}}
    assert schema["parameters"]["required"] == ["city"]



def test_tool_results_carry_no_loss_weight_and_model_tokens_do(envs, tiny_llama, monkeypatch):
    from transformers import AutoTokenizer

    import tunelab.training.episodes as episodes_module

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    env = EnvironmentClient("agentic_envs:Forced", timeout=30)
    try:
        sampler = EpisodeSampler(env, max_turns=3, seed=0)
        turns = iter([[CALL], ["The answer is 5."]])

        def fake_generate(model, tok, prompts, settings, batch_size):
            texts = next(turns)
            eot = episodes_module.end_of_turn_ids(tok)[0]
            return [Completion(tok(t, add_special_tokens=False)["input_ids"] + [eot], t, "stop", len(p))
                    for t, p in zip(texts, prompts)]

        monkeypatch.setattr(episodes_module, "generate", fake_generate)
        prompts = [[{"role": "user", "content": "What is 2 + 3?"}]]
        out = sampler.sample(None, tokenizer, prompts, [{}], [0], group_size=1, settings=episodes_module.SamplingSettings(),
                             batch_size=4, step=0)
    finally:
        env.close()
    episode, row = out.episodes[0], out.rows[0]
    assert episode.turns == 2 and episode.tool_calls == 1 and episode.tool_errors == 0
    assert [m["role"] for m in episode.messages][-3:] == ["assistant", "tool", "assistant"]
    assert episode.messages[-2]["content"] == "5" and out.completions[0].text == "The answer is 5."
    assert out.env_rewards.tolist() == [2.0]
    trained = [t for t, label in zip(row.input_ids, row.labels) if label != IGNORE_INDEX]
    assert trained == episode.model_tokens  # exactly the model's own tokens
    masked = tokenizer.decode([t for t, label in zip(row.input_ids, row.labels) if label == IGNORE_INDEX])
    assert "<tool_response>" in masked and "What is 2 + 3?" in masked
    assert "The answer is 5." in tokenizer.decode(trained) and "<tool_response>" not in tokenizer.decode(trained)


def _config(tmp_path, prompts, tiny_llama, env, *overrides, output="agent"):
    return load_config(None, [f"model={tiny_llama}", "recipe.name=grpo", f"data.train={prompts}", "method.name=lora", "method.r=4",
                              "train.batch_size=2", "train.lr=1e-2", "train.max_steps=2", "train.warmup_ratio=0",
                              "recipe.max_completion_length=8", "recipe.num_generations=2", "recipe.samples_every=1",
                              f"recipe.environment=agentic_envs:{env}", "recipe.max_turns=2",
                              "eval.probe=false", "eval.before=false", f"output_dir={tmp_path / output}", *overrides])


def test_two_steps_with_a_python_tools_environment(envs, tiny_llama):
    tmp_path, prompts = envs
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + 4?"},
                                                     {"role": "assistant", "content": str(i + 4)}]}) + "\n" for i in range(4)))
    result = grpo.main(_config(tmp_path, prompts, tiny_llama, "Forced", f"data.eval={held}"))
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines() if '"reward"' in line]
    assert len(logged) == 2 and {"episode/turns", "episode/tool_errors", "rewards/environment"} <= logged[0].keys()
    samples = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and samples[0]["messages"][0]["role"] == "user" and samples[0]["turns"] >= 1
    held_out = json.loads((result.run_dir / "eval.json").read_text())["episodes"]  # greedy episodes on data.eval
    assert held_out["before"]["episodes"] == held_out["after"]["episodes"] == 4
    assert held_out["after"]["reward"] == held_out["after"]["turns"] >= 1  # Forced's reward is the turn count


@pytest.mark.parametrize(("env", "message"), [
    ("Raises", r"environment 'agentic_envs:Raises': reset for example 0 .* raised RuntimeError: no database"),
    ("Hangs", r"environment 'agentic_envs:Hangs': reset for example 0 .* did not return within 2 s"),
    ("BadTypes", r"environment 'agentic_envs:BadTypes': reset for example 0 .* returned 'not messages'"),
])
def test_a_broken_environment_is_refused_by_name_before_anything_is_saved(envs, tiny_llama, env, message):
    tmp_path, prompts = envs
    config = _config(tmp_path, prompts, tiny_llama, env, "recipe.environment_timeout=2", "recipe.rewards=[{fn: exact_match}]",
                     output=env)
    with pytest.raises(TunelabError, match=message):
        grpo.main(config)
    assert not (tmp_path / env).exists()


def test_bad_step_results_are_refused_by_name(envs, tiny_llama):
    from transformers import AutoTokenizer

    import tunelab.training.episodes as episodes_module

    env = EnvironmentClient("agentic_envs:BadStep", timeout=30)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    episode = EpisodeSampler(env, max_turns=2, seed=0)._start([[{"role": "user", "content": "hi"}]], [{}], 0, 0, step=0,
                                                               tokenizer=tokenizer)
    try:
        with pytest.raises(TunelabError, match=r"'agentic_envs:BadStep': step for example 0 .* returned 42"):
            EpisodeSampler(env, max_turns=2, seed=0)._advance(
                tokenizer, episode, Completion([1], CALL, "stop", 3), 0, episodes_module.end_of_turn_ids(tokenizer))
    finally:
        env.close()


def test_environment_options_are_validated():
    assert GrpoOptions(rewards=[{"fn": "exact_match"}]).environment is None
    with pytest.raises(ValidationError, match="package.module:Class"):
        GrpoOptions(environment="ShopSql")
    with pytest.raises(ValidationError, match="max_turns only apply to agentic GRPO"):
        GrpoOptions(rewards=[{"fn": "exact_match"}], max_turns=3)
    with pytest.raises(ValidationError):
        GrpoOptions(environment="m:C", max_turns=0)


def test_the_shop_sql_environment_runs_queries_read_only():
    env = EnvironmentClient("tunelab.rewards.tool_envs:ShopSql", timeout=30)
    try:
        assert [t["function"]["name"] for t in env.tools] == ["run_sql"]
        assert env.reset("k", {"messages": [{"role": "user", "content": "q"}]}, 0, "for a test") is None
        calls = [{"id": "c0", "name": "run_sql", "arguments": {"query": "SELECT COUNT(*) FROM products"}},
                 {"id": "c1", "name": "run_sql", "arguments": {"query": "DELETE FROM products"}}]
        messages, errors = env.step("k", calls, "for a test")
        assert messages[0]["content"].strip().isdigit() and messages[0]["tool_call_id"] == "c0"
        assert messages[1]["content"].startswith("error:") and errors == 1
        env.close_episode("k", "for a test")
    finally:
        env.close()


def test_sigkill_then_resume_plays_the_same_episodes_to_the_same_adapter(envs, tiny_llama):
    from safetensors.torch import load_file

    tmp_path, prompts = envs

    def run(name: str, *args: str, kill_at: int | None = None):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"recipe: {{name: grpo, num_generations: 4, max_completion_length: 8, max_turns: 2,\n"
                        f"         environment: 'agentic_envs:Seeded'}}\n"
                        f"model: {tiny_llama}\nmethod: {{name: lora, r: 4}}\ndata: {{train: {prompts}}}\n"
                        "train: {max_steps: 6, batch_size: 2, grad_accum: 2, lr: 0.02, save_every: 2, seed: 3}\n"
                        f"eval: {{probe: false, before: false}}\noutput_dir: {tmp_path / name}\n")
        env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{tmp_path}"}
        if kill_at is not None:
            env["TUNELAB_TEST_SIGKILL_AT_STEP"] = str(kill_at)
        return subprocess.run([sys.executable, "-m", "tunelab", "train", str(path), *args], capture_output=True, text=True,
                              env=env, cwd=REPO, timeout=600)

    assert run("straight").returncode == 0
    assert run("killed", kill_at=3).returncode == -9
    resumed = run("killed", "--resume")
    assert resumed.returncode == 0 and "Resuming from" in resumed.stderr, resumed.stderr
    a = load_file(tmp_path / "straight/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "killed/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)  # it trained (B starts at zero)
    rewards = [json.loads(line)["rewards/environment"] for line in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()
               if '"rewards/environment"' in line]
    assert len(rewards) == 6 and len(set(rewards)) > 1  # the rewards varied: there was something to learn from
