"""Serving the embedded SmolLM2 with a freshly trained LoRA run: the served adapter answers exactly what the
run's own evaluation predicted (``eval.json``) and what ``tunelab eval`` predicts, and the base beside it
answers as the untuned model does, through the official ``openai`` client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.resolve import load_config
from tunelab.recipes import sft

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs/smollm2-135m-instruct/sft_lora.yaml"


def test_a_served_smollm2_adapter_answers_as_evaluation_predicts(tmp_path, monkeypatch):
    from openai import OpenAI

    from tunelab.evaluation.generate import generate_answers
    from tunelab.evaluation.run import load_for_eval
    from tunelab.serving.app import create_app
    from tunelab.serving.models import Registry
    from tunelab.serving.server import BackgroundServer

    monkeypatch.chdir(REPO)
    cfg = load_config(CONFIG, [f"output_dir={tmp_path / 'run'}", "train.max_steps=6", "train.lr=1e-3", "train.defaults=fixed", "train.warmup_ratio=0",
                               "eval.limit=6", "eval.probe=false", "eval.few_shot=0", "eval.before=false"])
    run = sft.main(cfg).run_dir
    report = json.loads((run / "eval.json").read_text())
    rows, max_new = report["tuned"]["examples"], report["settings"]["task"]["max_new_tokens"]
    prompts = [[{"role": "user", "content": row["prompt"]}] for row in rows]
    untuned = load_for_eval("smollm2-135m-instruct")
    base_answers = generate_answers(untuned.model, untuned.tokenizer, prompts, max_new_tokens=max_new)
    del untuned

    registry = Registry("smollm2-135m-instruct", base_id="smollm2")
    registry.load("reviews", run)
    assert registry.get("reviews").backbone is registry.get("smollm2").backbone  # one base in memory
    with BackgroundServer(create_app(registry)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)

        def answers(model: str) -> list[str]:
            return [client.chat.completions.create(model=model, messages=p, temperature=0, max_tokens=max_new)
                    .choices[0].message.content.strip() for p in prompts]

        assert answers("reviews") == [row["prediction"] for row in rows]
        assert answers("smollm2") == base_answers
    assert base_answers != [row["prediction"] for row in rows]  # the adapter changed answers: parity means something
