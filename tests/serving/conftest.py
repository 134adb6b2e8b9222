"""Fixtures for the server tests: two LoRA runs on one tiny llama (a few steps each, trained once per session),
a live server on a free port of 127.0.0.1 serving both, and the official ``openai`` client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.resolve import load_config

PROMPTS = [[{"role": "user", "content": f"Colour {i}?"}] for i in range(4)]


def _records(n: int, words: list[str]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Colour {i % 7}?"},
                          {"role": "assistant", "content": f"It is {words[i % len(words)]}."}]} for i in range(n)]


def train_tiny_run(root: Path, model: Path, name: str, words: list[str], seed: int = 0,
                   method: tuple[str, ...] = ("method.name=lora", "method.r=4")) -> Path:
    """A finished run of 6 steps on ``model`` (LoRA unless ``method`` says otherwise; eval of the tuned model only)."""
    from tunelab.recipes import sft

    root.mkdir(parents=True, exist_ok=True)
    train = root / f"{name}-train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _records(24, words)))
    evald = root / f"{name}-eval.jsonl"
    evald.write_text("".join(json.dumps(r) + "\n" for r in _records(4, words)))
    config = load_config(None, [f"model={model}", f"data.train={train}", f"data.eval={evald}", f"output_dir={root / name}",
                                "train.batch_size=4", "train.lr=5e-2", "train.max_steps=6", "train.warmup_ratio=0",
                                f"train.seed={seed}", "eval.probe=false", "eval.before=false", "eval.max_new_tokens=8",
                                *method])
    return sft.main(config).run_dir


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-runs")
    return {"red": train_tiny_run(root, tiny_llama, "red", ["red", "pink"]),
            "blue": train_tiny_run(root, tiny_llama, "blue", ["blue", "green"], seed=1)}


@pytest.fixture(scope="session")
def registry(tiny_runs):
    from tunelab.serving.models import Registry

    reg = Registry(str(tiny_runs["red"]), base_id="tiny")
    reg.load("blue", tiny_runs["blue"])
    return reg


@pytest.fixture(scope="session", params=["continuous", "dynamic"])
def server(registry, request):
    """The URL of a live server for ``registry``, once per batching mode (the tests share it and leave it as they
    found it), so every API test runs against both schedulers."""
    from tunelab.serving.app import create_app
    from tunelab.serving.server import BackgroundServer

    with BackgroundServer(create_app(registry, max_pending=256, batching=request.param)) as url:
        yield url


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def eval_predictions(tiny_runs, tiny_llama) -> dict[str, list[str]]:
    """What ``tunelab eval`` predicts (greedy, 8 tokens) for PROMPTS, per served model id."""
    from tunelab.evaluation.generate import generate_answers
    from tunelab.evaluation.run import load_for_eval

    out = {}
    for name, target in [("red", tiny_runs["red"]), ("blue", tiny_runs["blue"]), ("tiny", tiny_llama)]:
        loaded = load_for_eval(str(target))
        out[name] = generate_answers(loaded.model, loaded.tokenizer, PROMPTS, max_new_tokens=8)
    return out
