"""End-to-end on the embedded models (download their wheels on first use).

Slow (minutes on 2 CPU cores), but it runs in CI: it is the proof that the core works on real models and
not only on tiny random ones. The model-independent checks that matter most (data preparation, and a
short SQL run: learn, a small adapter, answers that stop, scores reproduced) also run on Gemma 3 270M, a
base model without a chat template whose vocabulary has its own turn markers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.resolve import load_config
from tunelab.recipes import sft

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs/smollm2-135m-instruct/sft_lora.yaml"
SQL_CONFIG = REPO / "configs/smollm2-135m-instruct/sft_lora_sql.yaml"
# (alias, extra overrides). Gemma (2x the parameters, a 262k vocabulary) gets a lower LoRA rank, no few-shot
# baseline and fewer eval examples, to keep its part of the slow suite to a few minutes on 2 cores. The base
# model has never emitted <end_of_turn>: with LoRA alone it does not learn to stop within a short run (12
# steps: p(<end_of_turn>) ~ 0, every answer runs to max_new_tokens); the recipe therefore trains the rows of
# the turn markers of the template it applies to a model without one (stages.setup.load_prepared_tokenizer).
MODELS = [pytest.param("smollm2-135m-instruct", [], id="smollm2"),
          pytest.param("gemma3-270m", ["method.r=8", "eval.few_shot=0", "eval.limit=6", "train.batch_size=4"], id="gemma3")]


def test_lora_on_embedded_model_learns_and_loads_with_peft(tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.evaluation.generate import generate_answers

    monkeypatch.chdir(REPO)
    cfg = load_config(CONFIG, [f"output_dir={tmp_path / 'run'}", "train.max_steps=10", "train.lr=1e-3", "train.warmup_ratio=0", "train.defaults=fixed",
                               "train.save_every=5", "train.eval_every=10", "eval.limit=4", "eval.probe=false", "eval.few_shot=0"])
    result = sft.main(cfg)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:2]) / 2, losses  # learns the one-word answer format

    adapter_config = json.loads((result.artifact_dir / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(adapter_config["base_model_name_or_path"])
    tuned = PeftModel.from_pretrained(base, result.artifact_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.artifact_dir)
    prompt = ("Classify the sentiment of this review of a toaster as positive, negative or mixed. Answer with one word."
              "\n\nReview: This toaster broke after a week and looks cheap.")
    [answer] = generate_answers(tuned, tokenizer, [[{"role": "user", "content": prompt}]], max_new_tokens=6)
    assert answer.split()[0].strip(".").lower() in {"positive", "negative", "mixed"}, answer


@pytest.mark.parametrize("alias, _", MODELS)
def test_data_inspect_on_embedded_model(alias, _):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "COLUMNS": "250"}
    proc = subprocess.run([sys.executable, "-m", "tunelab", "data", "inspect", str(CONFIG), f"model={alias}"],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "320" in proc.stdout  # records
    assert "template" in proc.stdout and "assistant" in proc.stdout
    if alias == "gemma3-270m":  # no template of its own: Gemma's markers, which its vocabulary has, not added ChatML
        assert "<start_of_turn>" in proc.stdout and "<|im_start|>" not in proc.stdout


def test_gguf_file_path_converts_to_the_same_weights(tmp_path, monkeypatch):
    """``model: file.gguf`` converts once into the cache and gives the same weights as the alias."""
    from safetensors import safe_open

    from tunelab.models.embedded import EMBEDDED, _extract_gguf, ensure_embedded
    from tunelab.models.load import resolve_model_path

    alias_dir = ensure_embedded("smollm2-135m-instruct")
    gguf = _extract_gguf(EMBEDDED["smollm2-135m-instruct"])
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    converted = Path(resolve_model_path(str(gguf)))
    assert converted.is_relative_to(tmp_path / "cache") and (converted / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    name = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(alias_dir / "model.safetensors", "pt") as a, safe_open(converted / "model.safetensors", "pt") as b:
        assert a.get_tensor(name).equal(b.get_tensor(name))
    assert resolve_model_path(str(gguf)) == str(converted)  # cached: no second conversion


@pytest.mark.parametrize("alias, extra", [m for m in MODELS if m.id != "smollm2"])  # SmolLM2's: the dashboard's demo test
def test_sql_before_after_with_independent_rescoring(alias, extra, tmp_path, monkeypatch):
    """A short SQL run on a real model, its figures checked by code written in the tests (``sql_checks``)."""
    from sql_checks import check_sql_run

    from tunelab.examples.sql.task import build_database

    monkeypatch.chdir(REPO)
    db = build_database(tmp_path / "shop.sqlite")
    probe = tmp_path / "probe.jsonl"
    probe.write_text("\n".join((REPO / "src/tunelab/evaluation/probes/general.jsonl").read_text().splitlines()[:6]) + "\n")
    cfg = load_config(SQL_CONFIG, [
        f"model={alias}", f"output_dir={tmp_path / 'run'}", f"eval.db={db}", "train.max_steps=8", "eval.limit=8",
        "train.defaults=fixed", "train.lr=1e-3",
        "eval.few_shot=1", f"eval.probe={probe}", *extra])
    result = sft.main(cfg)
    check_sql_run(result.run_dir, result.artifact_dir, db, cfg.eval.max_new_tokens, probe_items=6)


def test_compare_sweep_on_embedded_model(tmp_path, monkeypatch):
    """A reduced sweep on the real model: the report's numbers are the candidates' own, and RAG retrieves."""
    from tunelab.compare.sweep import parse_candidates, run_compare
    from tunelab.examples.sql.task import build_database

    monkeypatch.chdir(REPO)
    db = build_database(tmp_path / "shop.sqlite")
    sweep = run_compare(REPO / "configs/smollm2-135m-instruct/sft_lora_sql.yaml",
                        [f"eval.db={db}", "eval.limit=6", "eval.probe=false", "train.max_steps=3", "eval.batch_size=16", "train.defaults=fixed",
                         f"output_dir={tmp_path / 'run'}"],
                        parse_candidates("zero_shot,rag,ia3"), tmp_path / "sweep")
    report = json.loads((sweep / "report.json").read_text())
    rows = {c["name"]: c for c in report["candidates"]}
    own = json.loads((sweep / "ia3" / "eval.json").read_text())
    assert rows["ia3"]["status"] == "finished" and rows["ia3"]["score"] == own["tuned"]["score"]
    assert rows["rag"]["score"] == own["baselines"]["rag"]["score"]
    assert rows["rag"]["score"] > rows["zero_shot"]["score"]  # retrieved same-intent examples help the untuned model
    assert report["recommendation"]["text"]
