"""Shared fixtures: tiny models saved once per session, small chat datasets, config builders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tunelab.resolve import load_config
from tunelab.models.tiny import save_tiny_model


@pytest.fixture(scope="session", autouse=True)
def tokenized_cache(tmp_path_factory):
    """Tests (and the processes they start) cache tokenized data in a temporary folder, not the user's."""
    folder = tmp_path_factory.mktemp("tokenized-cache")
    previous = os.environ.get("TUNELAB_TOKENIZED_CACHE")
    os.environ["TUNELAB_TOKENIZED_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("TUNELAB_TOKENIZED_CACHE", None)
    else:
        os.environ["TUNELAB_TOKENIZED_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def six_block_llama(tmp_path_factory) -> Path:
    """A tiny llama of six decoder blocks (gradient checkpointing of some of them)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-6"), "llama", layers=6)


@pytest.fixture(scope="session")
def tiny_base_llama(tmp_path_factory) -> Path:
    """A tiny "base model" llama (untied embeddings): no chat template, no ChatML tokens in the vocabulary."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-base-llama"), "llama", chat_template=None, chatml_tokens=False)


@pytest.fixture(scope="session")
def tiny_base_qwen2(tmp_path_factory) -> Path:
    """A tiny "base model" qwen2 (tied embeddings): no chat template, no ChatML tokens in the vocabulary."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-base-qwen2"), "qwen2", chat_template=None, chatml_tokens=False)


def chat_records(n: int, seed: int = 0) -> list[dict]:
    """Short deterministic conversations a tiny model can partly memorise."""
    words = ["red", "blue", "green", "black", "white", "pink"]
    rows = []
    for i in range(n):
        w = words[(i + seed) % len(words)]
        rows.append({"messages": [{"role": "user", "content": f"Colour {i % 7}?"}, {"role": "assistant", "content": f"It is {w}."}]})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def chat_data(tmp_path) -> dict[str, Path]:
    return {
        "train": write_jsonl(tmp_path / "train.jsonl", chat_records(24)),
        "eval": write_jsonl(tmp_path / "eval.jsonl", chat_records(6, seed=3)),
    }


@pytest.fixture
def make_config(tmp_path, chat_data, tiny_llama):
    """Build a RunConfig for a tiny model from dotted overrides."""

    def build(*overrides: str, model: Path | None = None, output: str = "run", method: str = "lora"):
        base = [
            f"model={model or tiny_llama}",
            f"data.train={chat_data['train']}",
            f"data.eval={chat_data['eval']}",
            f"output_dir={tmp_path / output}",
            "train.batch_size=4",
            "train.lr=1e-2",
            "train.max_steps=6",
            "train.warmup_ratio=0",
            "eval.probe=false",
        ] + (["method.name=lora", "method.r=4"] if method == "lora" else [f"method.name={method}"])
        return load_config(None, base + list(overrides))

    return build
