"""tunelab.planning: parameter counts, trainable counts, memory behaviour, the H100 anchors, CPU measurement."""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console

from tunelab.resolve import load_config
from tunelab.errors import TunelabError
from tunelab.methods import count_parameters, get_method, trainable_parameters
from tunelab.planning import (
    GPUS, Device, GiB, ModelShape, checkpointed_blocks, load_shape, plan, print_plan, resolve_device,
)
from tunelab.recipes.sft import adamw
from tunelab.stages.profile import profile_data
from tunelab.stages.model import enable_checkpointing, limit_checkpointing



@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The embedded real model, converted once into tunelab's cache (the slow tests use the same copy)."""
    from tunelab.models.load import resolve_model_path

    return Path(resolve_model_path("smollm2-135m-instruct"))


# The anchor shapes, as `shared/anchors/lora_throughput.py` builds them (random weights, real shapes).
ANCHOR_SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
# GPU figures taken from shared/anchors/README.md (H100 80GB, torch.cuda.max_memory_allocated, seq 2048), not
# measured by this test: HF + peft LoRA r=16 on all linear layers, dropout 0, bf16 weights under bf16 autocast,
# `out = model(input_ids, labels=ids); out.loss.backward()` (logits at every position, kept through backward),
# no padding; full fine-tuning: float32 weights under bf16 autocast.
_LORA = ["method.name=lora", "method.r=16", "method.dropout=0", "method.target_modules=all-linear", "model.dtype=bfloat16"]
ANCHORS = [
    # (shape, method overrides, micro-batch, gradient checkpointing, kernels, measured peak GiB)
    ("llama-3.2-1b", _LORA, 8, True, "hf", 31.1),
    ("llama-3.2-1b", _LORA, 8, False, "hf", 58.5),
    ("llama-3.2-1b", _LORA, 8, False, "liger", 26.1),
    ("llama-3.2-1b", _LORA, 8, False, "liger", 26.4),  # + torch.compile (not modelled: same as liger)
    ("llama-3.2-1b", _LORA, 8, True, "liger", 6.0),
    ("llama-3.2-1b", ["method.name=full", "model.dtype=float32"], 4, True, "hf", 29.2),
    ("llama-3.1-8b", _LORA, 4, True, "hf", 31.4),
    ("llama-3.1-8b", _LORA, 4, True, "liger", 19.8),
]


def _config(model: Path, *overrides: str, data: str = "/nonexistent/train.jsonl"):
    return load_config(None, [f"model={model}", f"data.train={data}", *overrides])


@pytest.fixture(scope="module")
def anchor_dirs(tmp_path_factory) -> dict[str, Path]:
    from transformers import LlamaConfig

    dirs = {}
    for name, shape in ANCHOR_SHAPES.items():
        dirs[name] = tmp_path_factory.mktemp(name)
        LlamaConfig(**shape, max_position_embeddings=8192).save_pretrained(dirs[name])  # config.json only
    return dirs


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


# ------------------------------------------------------------------------------------ parameter counts
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_parameter_count_from_config_equals_the_model(fixture, request):
    path = request.getfixturevalue(fixture)
    shape = load_shape(_config(path))
    assert sum(shape.parameter_table().values()) == count_parameters(_load(path))[1]


def test_parameter_names_are_the_models(tiny_qwen2):
    table = load_shape(_config(tiny_qwen2)).parameter_table()
    model = _load(tiny_qwen2)
    assert table == {name: p.numel() for name, p in model.named_parameters()}


@pytest.mark.slow
def test_parameter_count_of_the_real_model(smollm2):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # the real architecture, without reading weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2))
    assert sum(load_shape(_config(smollm2)).parameter_table().values()) == count_parameters(model)[1]


def test_qwen3_shape_counts_qk_norms():
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(ModelShape.from_config(config).parameter_table().values()) == count_parameters(model)[1]


@pytest.mark.parametrize("method, options", [
    ("lora", ["method.r=4"]),
    ("lora", ["method.r=8", "method.target_modules=[q_proj, v_proj]"]),
    ("full", []),
    ("freeze", ["method.last_n_blocks=1"]),
    ("ia3", []),
    ("prompt", ["method.num_virtual_tokens=5"]),
    ("prefix", ["method.num_virtual_tokens=5"]),
    ("adapter", ["method.bottleneck=8"]),
])
def test_trainable_count_equals_the_applied_method(tiny_llama, method, options):
    config = _config(tiny_llama, f"method.name={method}", *options)
    model = get_method(method).apply(_load(tiny_llama), config.method)
    expected = sum(p.numel() for p in trainable_parameters(model).values())
    assert plan(config, "cpu").trainable_params == expected


# --------------------------------------------------------------------------------------- memory shape
@pytest.mark.slow
def test_memory_grows_with_batch_and_sequence_and_checkpointing_lowers_it(smollm2):
    def peak(*overrides: str) -> int:
        return plan(_config(smollm2, *overrides), "h100-80gb").memory.total

    base = peak("train.batch_size=4", "data.max_length=512")
    assert peak("train.batch_size=8", "data.max_length=512") > base
    assert peak("train.batch_size=4", "data.max_length=1024") > base
    assert peak("train.batch_size=4", "data.max_length=512", "train.gradient_checkpointing=true") < base
    assert peak("train.batch_size=4", "data.max_length=512", "method.name=full") > base


def test_qlora_plan_is_below_lora(anchor_dirs):
    model = anchor_dirs["llama-3.1-8b"]
    common = ["train.batch_size=2", "data.max_length=1024", "train.gradient_checkpointing=true", "method.r=16"]
    lora = plan(_config(model, "method.name=lora", *common), "l4")
    qlora = plan(_config(model, "method.name=qlora", "method.bits=4", *common), "l4")
    eight = plan(_config(model, "method.name=qlora", "method.bits=8", *common), "l4")
    assert qlora.memory.total < eight.memory.total < lora.memory.total
    # ~0.52 byte per quantised block weight; embeddings, lm_head and norms float32 (peft's kbit preparation)
    assert qlora.memory.weights == pytest.approx(0.516 * 6.98e9 + 4 * 1.05e9, rel=0.01)
    assert not lora.fits and qlora.fits


def test_phases_and_components_agree(tiny_llama):
    p = plan(_config(tiny_llama, "train.batch_size=4", "data.max_length=128"), "h100-80gb")
    assert p.memory.total == p.memory.phases[p.memory.peak_phase] + p.memory.overhead
    assert p.memory.peak_phase == max(p.memory.phases, key=p.memory.phases.get)
    assert p.memory.overhead == int(0.5 * GiB)


@pytest.mark.parametrize("shape, overrides, batch, checkpointing, kernels, measured", ANCHORS)
def test_anchor_gpu_peaks_within_ten_percent(anchor_dirs, shape, overrides, batch, checkpointing, kernels, measured):
    config = _config(anchor_dirs[shape], *overrides, f"train.batch_size={batch}", "data.max_length=2048",
                     "train.precision=bf16", f"train.gradient_checkpointing={checkpointing}")
    p = plan(config, "h100-80gb", kernels=kernels, held_logits=True, padded=False)
    # the anchors report torch.cuda.max_memory_allocated: tensors only, no CUDA context
    assert p.memory.tensors / GiB == pytest.approx(measured, rel=0.10)


# ------------------------------------------------------------------------ measured on this CPU (tiny)
def _measured_cpu_peak(path: Path, config, blocks: int | None = None) -> int:
    """Peak live tensor bytes of the second training step (Adam states present), from the profiler, with
    ``blocks`` checkpointed blocks (default: as the config resolves on this CPU)."""
    from torch.profiler import ProfilerActivity, profile

    from tunelab.training.loss import summed_loss_of_batch

    torch.manual_seed(0)
    model = _load(path).train()
    if blocks is None:
        blocks = checkpointed_blocks(config, load_shape(config), resolve_device("cpu"))
    enable_checkpointing(model, blocks)
    model.config.use_cache = False
    model = get_method(config.method.name).apply(model, config.method)
    assert limit_checkpointing(model, blocks) == blocks
    params = list(trainable_parameters(model).values())
    optimizer = adamw(params)  # the training loop's optimizer
    ids = torch.randint(4, model.config.vocab_size, (config.train.batch_size, config.data.max_length))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step():
        summed_loss_of_batch(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    base = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in model.parameters()}.values())
    base += sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return base + peak


@pytest.mark.parametrize("overrides", [
    ["method.name=lora", "train.batch_size=4", "data.max_length=128"],
    ["method.name=lora", "train.batch_size=2", "data.max_length=256", "train.gradient_checkpointing=true"],
    ["method.name=full", "train.batch_size=4", "data.max_length=128", "train.gradient_checkpointing=true"],
])
def test_cpu_estimate_matches_a_measured_step(tiny_llama, overrides):
    config = _config(tiny_llama, *overrides)
    estimate = plan(config, "cpu", padded=False).memory.tensors
    assert estimate == pytest.approx(_measured_cpu_peak(tiny_llama, config), rel=0.10)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_auto_checkpointing_picks_the_fewest_blocks_that_fit_and_the_measured_peak_agrees(six_block_llama, method):
    """On a device between the plan without and with full checkpointing, ``auto`` checkpoints some but not
    all blocks, the plan's peak is under the budget, and a measured step with those blocks agrees."""
    config = _config(six_block_llama, f"method.name={method}", "train.batch_size=4", "data.max_length=256",
                     "train.gradient_checkpointing=auto")
    shape, cpu = load_shape(config), resolve_device("cpu")
    none = plan(config.model_copy(update={"train": config.train.model_copy(update={"gradient_checkpointing": False})}), "cpu")
    every = plan(config.model_copy(update={"train": config.train.model_copy(update={"gradient_checkpointing": True})}), "cpu")
    assert every.memory.total < none.memory.total
    device = Device("small", "cpu", int((none.memory.total + every.memory.total) / 2 / 0.95), note="test")
    blocks = checkpointed_blocks(config, shape, device)
    assert 0 < blocks < shape.layers
    assert checkpointed_blocks(config, shape, replace(cpu, memory_bytes=10 * none.memory.total)) == 0
    assert checkpointed_blocks(config, shape, replace(cpu, memory_bytes=every.memory.total // 2)) == shape.layers
    from tunelab.planning.planner import _Knobs, _memory_of

    chosen = _memory_of(config, shape, device, _Knobs(padded=False), blocks)[0]  # the measured rows carry no padding
    fewer = _memory_of(config, shape, device, _Knobs(), blocks - 1)[0]
    assert _memory_of(config, shape, device, _Knobs(), blocks)[0].total <= 0.95 * device.memory_bytes < fewer.total
    measured = _measured_cpu_peak(six_block_llama, config, blocks)
    assert chosen.tensors == pytest.approx(measured, rel=0.10)


# ---------------------------------------------------------------------------------- time and devices
def test_time_follows_the_formula(tiny_llama):
    config = _config(tiny_llama, "train.batch_size=4", "data.max_length=128", "train.epochs=2")
    p = plan(config, "h100-80gb", tokens_per_epoch=1_000_000, mfu=0.5)
    assert p.time.tokens_source == "given"
    assert p.time.seconds == pytest.approx(2_000_000 * p.time.flops_per_token / (790e12 * 0.5))


@pytest.mark.parametrize("method, factor", [("lora", 4), ("full", 6)])
def test_flops_per_token_agree_with_the_anchors_formula(anchor_dirs, method, factor):
    # anchors: (4 N for LoRA, 6 N full) + 12 L d T / 2, N = all parameters with lm_head counted once
    shape = ANCHOR_SHAPES["llama-3.2-1b"]
    p = plan(_config(anchor_dirs["llama-3.2-1b"], f"method.name={method}", "data.max_length=2048"), "h100-80gb",
             tokens_per_epoch=2048)
    anchor = factor * p.total_params + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * 2048 / 2
    extra = p.trainable_params if method == "lora" else 0  # the adapter's own matmuls
    assert p.time.flops_per_token == pytest.approx(anchor + 6 * extra - factor * extra, rel=0.01)
    ckpt = plan(_config(anchor_dirs["llama-3.2-1b"], f"method.name={method}", "data.max_length=2048",
                        "train.gradient_checkpointing=true"), "h100-80gb", tokens_per_epoch=2048)
    assert ckpt.time.flops_per_token > p.time.flops_per_token  # the recomputed forward


def test_time_counts_examples_when_tokens_are_unknown(make_config):
    p = plan(make_config("train.max_steps=null", "train.epochs=1"), "h100-80gb")
    assert p.time.tokens_per_epoch == 24 * 1024 and "upper bound" in p.time.tokens_source
    assert p.time.steps == 6  # 24 examples, batch 4


def test_profile_data_measures_the_real_batches(make_config):
    config, profile = profile_data(make_config("train.max_steps=null"))
    assert profile.examples == 24
    assert profile.tokens <= profile.processed_tokens <= 24 * profile.longest
    p = plan(config, "cpu", data=profile)
    assert p.batch[1] == profile.peak_seq and p.time.tokens_per_epoch == profile.processed_tokens
    assert p.memory.total < plan(config, "cpu").memory.total  # real batches are shorter than max_length


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(TunelabError) as err:
        resolve_device("h800")
    for name in [*GPUS, "cpu", "current"]:
        assert name in str(err.value)


def test_current_device_falls_back_to_cpu_ram():
    device = resolve_device(None)
    if not torch.cuda.is_available():
        assert device.kind == "cpu" and device.memory_bytes > 1 * GiB


def test_too_big_gets_suggestions_and_prints(anchor_dirs):
    config = _config(anchor_dirs["llama-3.2-1b"], "method.name=lora", "train.batch_size=32", "data.max_length=2048",
                     "train.gradient_checkpointing=false")
    p = plan(config, "l4")
    assert not p.fits and p.suggestions and "gradient_checkpointing" in p.suggestions[0]
    assert "(fits)" in p.suggestions[-1]
    auto = plan(config.model_copy(update={"train": config.train.model_copy(update={"gradient_checkpointing": "auto"})}), "l4")
    assert auto.checkpointed_blocks == auto.shape.layers  # auto already checkpoints every block; the rest is suggested
    assert not auto.fits and "gradient_checkpointing" not in auto.suggestions[0] and "(fits)" in auto.suggestions[-1]
    assert auto.fits_by_gpu["h100-80gb"] and not auto.fits_by_gpu["l4"]
    out = io.StringIO()
    print_plan(p, Console(file=out, width=160))
    text = out.getvalue()
    assert "does not fit" in text and "h100-80gb" in text and "Assumptions" in text
    json.dumps(p.memory.components())  # plain numbers, ready for --json


@pytest.mark.slow
def test_embedded_shape_matches_the_converted_model(smollm2):
    from tunelab.planning.shape import _EMBEDDED_SHAPES

    assert load_shape(_config(smollm2)) == _EMBEDDED_SHAPES["smollm2-135m-instruct"]


def test_embedded_alias_is_planned_without_converting_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))  # an empty cache: nothing downloaded or converted
    p = plan(load_config(None, ["data.train=/nonexistent.jsonl", "train.batch_size=2", "data.max_length=64"]), "cpu")
    assert p.total_params - p.trainable_params == 134_515_008  # lora (the default method) adds the rest
    assert not any(tmp_path.iterdir())


def test_suggestions_stop_when_nothing_helps(anchor_dirs):
    # full fine-tuning of 8B: the optimizer step alone (weights, gradients, Adam) exceeds a T4 whatever the batch
    p = plan(_config(anchor_dirs["llama-3.1-8b"], "method.name=full", "train.batch_size=4", "data.max_length=512"), "t4")
    assert not p.fits and all("fits)" not in line for line in p.suggestions)


def test_a_non_llama_config_is_a_clear_error(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(TunelabError, match="llama-style decoders"):
        load_shape(_config(tmp_path))


# ------------------------------------------------------------------------------- methods describe themselves
def test_a_method_without_a_footprint_is_refused_not_guessed(tiny_llama, monkeypatch):
    monkeypatch.delattr(type(get_method("full")), "footprint")
    with pytest.raises(TunelabError, match="cannot plan method 'full'"):
        plan(_config(tiny_llama, "method.name=full"), "cpu")


def test_the_planner_holds_no_method_names():
    from tunelab.methods import method_names

    folder = Path(__file__).parents[2] / "src" / "tunelab" / "planning"
    for source in folder.glob("*.py"):
        text = source.read_text(encoding="utf-8")
        named = [n for n in method_names() if f'"{n}"' in text or f"'{n}'" in text]
        assert not named, f"{source.name} decides by method name {named}: ask the method (its footprint) instead"
        assert not re.search(r"^\s*(from|import) tunelab\.recipes", text, re.M), f"{source.name} imports recipes"


def test_grpo_plans_its_groups_and_the_generation_phase(anchor_dirs, tiny_llama):
    common = ["recipe=grpo", "train.batch_size=4", "data.max_length=128", "method.name=lora"]
    sft = plan(_config(tiny_llama, *common[1:]), "h100-80gb")
    grpo = plan(_config(tiny_llama, *common, "recipe.num_generations=8"), "h100-80gb")
    assert grpo.batch == (8 * sft.batch[0], 128 + 64)  # each prompt trains its group of prompt + completion rows
    assert "generation" in grpo.memory.phases and "KV cache" in grpo.recipe_note
    assert grpo.memory.total == grpo.memory.phases[grpo.memory.peak_phase] + grpo.memory.overhead
    model = anchor_dirs["llama-3.1-8b"]  # a real KV cache: 32 layers x 8 kv heads x 128 dims, bf16
    wide = ["recipe=grpo", "method.name=lora", "train.batch_size=1", "data.max_length=256", "recipe.num_generations=16",
            "train.gradient_checkpointing=true", "recipe.max_completion_length=3840", "recipe.generation_batch_size=16"]
    big = plan(_config(model, *wide), "h100-80gb")
    kv = 2 * 32 * 8 * 128 * 16 * (256 + 3840) * 2
    assert big.memory.phases["generation"] >= kv + big.memory.weights
    small = plan(_config(model, *wide[:-1], "recipe.generation_batch_size=4"), "h100-80gb")
    assert small.memory.phases["generation"] < big.memory.phases["generation"] - 0.7 * kv
