"""The architecture contract matrix: every current model type (``archs.ARCHITECTURES``, tiny random models of
2 blocks built from the type's config class) through each cell of ``archs.CELLS``. A cell listed in
``archs.REFUSED`` must be refused by name before anything loads (a TunelabError whose message says why), every
other cell must work. ``docs/architectures.md`` is generated from the same data (``table.py``) and checked here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tunelab.errors import TunelabError
from tunelab.resolve import load_config

from architectures.archs import ARCHITECTURES, MOE, REFUSED, TINY_OPTIONS
from conftest import chat_records, write_jsonl

TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arch-data")
    return {"train": write_jsonl(root / "train.jsonl", chat_records(8)), "eval": write_jsonl(root / "eval.jsonl", chat_records(2, seed=3))}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, Path]:
    """Preference pairs for the dpo cell: the polite answer chosen."""
    root = tmp_path_factory.mktemp("arch-pairs")
    rows = [{"prompt": f"Colour {i}?", "chosen": f"It is {w}, thanks.", "rejected": f"It is {w}!"}
            for i, w in enumerate(["red", "blue", "green", "black", "white", "pink", "grey", "gold"])]
    return {"train": write_jsonl(root / "pairs.jsonl", rows[:6]), "eval": write_jsonl(root / "held.jsonl", rows[6:])}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> dict[str, Path]:
    """Prompts for the grpo cell (no eval file: GRPO samples from the train prompts only)."""
    root = tmp_path_factory.mktemp("arch-prompts")
    return {"train": write_jsonl(root / "prompts.jsonl", [{"prompt": f"Colour {i}?"} for i in range(4)])}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch(request, tmp_path_factory) -> tuple[str, Path]:
    from tunelab.models.tiny import save_tiny_of_type

    model_type = request.param
    return model_type, save_tiny_of_type(tmp_path_factory.mktemp(model_type), model_type, **ARCHITECTURES[model_type][1])


def _config(model: Path, data: dict[str, Path], out: Path, method: str, *extra: str):
    held = [f"data.eval={data['eval']}"] if "eval" in data else []
    return load_config(None, [f"model={model}", f"data.train={data['train']}", *held, f"output_dir={out}",
                              "train.batch_size=4", "train.max_steps=2", "train.warmup_ratio=0", "train.lr=5e-2",
                              "eval.probe=false", "eval.before=false", "eval.max_new_tokens=4", f"method.name={method}",
                              *TINY_OPTIONS.get(method, []), *extra])


def _train(model: Path, data, out: Path, method: str, *extra: str):
    from tunelab.recipes import sft

    return sft.main(_config(model, data, out, method, *extra))


def _refused(model_type: str, cell: str, run) -> bool:
    """Run the cell; True when it was refused as the matrix says it must be (and nothing was loaded)."""
    reason = REFUSED.get((model_type, cell))
    if reason is None:
        run()
        return False
    with pytest.raises(TunelabError, match=reason):
        run()
    return True


@pytest.fixture(scope="module")
def lora_run(arch, data, tmp_path_factory) -> Path:
    model_type, model = arch
    started = time.perf_counter()
    run_dir = _train(model, data, tmp_path_factory.mktemp(f"{model_type}-lora") / "run", "lora").run_dir
    TIMES[f"{model_type}/lora"] = time.perf_counter() - started
    return run_dir


def test_lora_trains_saves_and_merges_verified(arch, lora_run, tmp_path):
    from tunelab.merging.fold import merge_run

    model_type, _ = arch
    manifest = json.loads((lora_run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and (lora_run / "adapter" / "adapter_config.json").is_file()
    adapter = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    if model_type in MOE:
        assert adapter["target_parameters"], "LoRA left the experts untrained"
    report = merge_run(lora_run, tmp_path / "merged", prompts=2, new_tokens=4)
    assert report["verification"]["passed"], report["verification"]


@pytest.mark.parametrize("method", ["full", "ia3", "prefix", "prompt"])
def test_other_methods_train_or_are_refused_by_name(arch, data, tmp_path, method):
    model_type, model = arch
    if _refused(model_type, method, lambda: _train(model, data, tmp_path / "run", method)):
        assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.safetensors"))
        return
    artifact = "model" if method == "full" else "adapter"
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "finished"
    assert any((tmp_path / "run" / artifact).glob("*.safetensors"))


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_dora_on_experts_is_refused_before_loading(model_type, data, tmp_path):
    """MoE types only (DoRA on dense models is in tests/methods' contract); the refusal comes before loading, so
    the model is saved here rather than by the module's ``arch`` fixture."""
    from tunelab.models.tiny import save_tiny_of_type

    model = save_tiny_of_type(tmp_path / "model", model_type, **ARCHITECTURES[model_type][1])
    _refused(model_type, "dora", lambda: _train(model, data, tmp_path / "run", "lora", "method.use_dora=true"))


def test_plan_answers(arch, data, tmp_path):
    from tunelab.planning import plan

    model_type, model = arch
    result = plan(_config(model, data, tmp_path / "run", "lora"), "cpu")
    assert result.total_params > result.trainable_params > 0 and result.memory.total > 0
    assert (result.active_params is not None) == (model_type in MOE)
    if model_type in MOE:
        assert result.active_params < result.total_params


@pytest.mark.parametrize("batching", ["continuous", "dynamic"])
def test_served_answer_equals_eval(arch, lora_run, batching):
    from tunelab.generation import SamplingSettings
    from tunelab.serving.continuous import ContinuousScheduler
    from tunelab.serving.models import Registry
    from tunelab.serving.scheduler import Job, Scheduler

    report = json.loads((lora_run / "eval.json").read_text())
    predictions = [row["prediction"].strip() for row in report["tuned"]["examples"]]
    registry = Registry(str(lora_run), base_id="base")
    scheduler = (ContinuousScheduler if batching == "continuous" else Scheduler)(registry)
    scheduler.start()
    try:
        prompts = [record["messages"][:1] for record in chat_records(2, seed=3)]  # the eval file's questions
        served = registry.get(lora_run.name)
        jobs = [Job(served, [p], SamplingSettings(max_new_tokens=4), tokens=64 + 4) for p in prompts]
        for job in jobs:
            scheduler.submit(job)
        answers = [job.future.result(120)[0].text.strip() for job in jobs]
    finally:
        scheduler.stop()
    assert answers == predictions


def test_lora_resumed_after_a_failure_equals_the_uninterrupted_run(arch, data, lora_run, tmp_path, monkeypatch):
    """In-process and cheap: ``TUNELAB_TEST_FAIL_AT_STEP`` raises after step 1 (checkpointed: save_every=1), the
    resume trains step 2 from that checkpoint; its adapter must equal the lora cell's uninterrupted 2 steps bit for
    bit (weights, optimizer moments, schedule, data order and RNG all restored)."""
    import torch
    from safetensors.torch import load_file

    from tunelab.recipes import sft

    model_type, model = arch
    config = _config(model, data, tmp_path / "run", "lora", "train.save_every=1")
    reason = REFUSED.get((model_type, "resume"))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("TUNELAB_TEST_FAIL_AT_STEP", "0:1")
    with pytest.raises(TunelabError, match=reason or "failing on purpose after step 1 "):
        sft.main(config)
    if reason:
        return
    monkeypatch.delenv("TUNELAB_TEST_FAIL_AT_STEP")
    run_dir = sft.main(config, resume=True).run_dir
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["steps_done"] == 2
    assert [entry["from_step"] for entry in manifest["resumed"]] == [1]  # step 2 only, from the checkpoint
    straight = load_file(lora_run / "adapter" / "adapter_model.safetensors")
    resumed = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    assert [k for k in straight if not torch.equal(straight[k], resumed[k])] == []


def _finished_with_adapter(run_dir: Path, recipe: str) -> list[dict]:
    """The run finished its 2 steps and saved an adapter; its logged training rows."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["recipe"] == recipe and manifest["steps_done"] == 2
    assert any((run_dir / "adapter").glob("*.safetensors"))
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in logged if "loss" in row]


def test_dpo_trains_and_saves(arch, pairs, tmp_path):
    import torch

    from tunelab.recipes import dpo

    model_type, model = arch
    config = _config(model, pairs, tmp_path / "run", "lora", "recipe.name=dpo")
    if _refused(model_type, "dpo", lambda: dpo.main(config)):
        return
    logged = _finished_with_adapter(tmp_path / "run", "dpo")
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(row["loss"])) for row in logged)
    assert any(row["grad_norm"] > 0 for row in logged)  # the adapter got a gradient


def test_grpo_trains_and_saves(arch, prompts, tmp_path):
    from tunelab.recipes import grpo

    model_type, model = arch
    config = _config(model, prompts, tmp_path / "run", "lora", "recipe.name=grpo", "recipe.num_generations=2",
                     "recipe.max_completion_length=4", "recipe.rewards=[{fn: length_penalty, target: 8, unit: chars}]")
    if _refused(model_type, "grpo", lambda: grpo.main(config)):
        return
    logged = _finished_with_adapter(tmp_path / "run", "grpo")
    assert len(logged) == 2 and all("reward" in row for row in logged)
    # completions of unequal lengths: some groups carry an advantage, so the adapter got a gradient
    assert any(row.get("grad_norm", 0) > 0 for row in logged)
