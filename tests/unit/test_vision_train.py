"""``method.train_vision`` on tiny random LLaVA and Idefics3: which parameters each value makes trainable for
LoRA, full and freeze tuning, that a short SFT run moves the projector only when asked, and the refusals (a
method that cannot, a text-only model, data without images, a bad value)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tunelab.errors import ConfigError, TunelabError
from tunelab.models.vision import build_tiny_vlm, save_tiny_vlm, vision_parts
from tunelab.resolve import load_config

ARCHS = ("llava", "idefics3")


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory) -> dict[str, Path]:
    return {arch: save_tiny_vlm(tmp_path_factory.mktemp(arch), arch) for arch in ARCHS}


def _data(tmp_path: Path, images: bool = True) -> Path:
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "a.png")
    user = [{"type": "image", "path": "a.png"}, {"type": "text", "text": "Colour?"}] if images else "Colour?"
    rows = [{"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "red"}]}] * 4
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _config(tmp_path, model, data, *extra):
    """A two-step SFT config (LoRA r=4 unless ``extra`` names another method), no evaluation."""
    method = next((e for e in extra if e.startswith("method.name=")), "method.name=lora")
    return load_config(None, [f"model={model}", f"data.train={data}", f"output_dir={tmp_path / 'run'}", method,
                              *(["method.r=4"] if method == "method.name=lora" else []), "train.batch_size=2",
                              "train.max_steps=2", "train.warmup_ratio=0", "train.lr=1e-2", "eval.before=false",
                              "eval.probe=false", "train.defaults=fixed", *extra])


def _trainable_parts(tuned) -> dict[str, bool]:
    """Whether anything in the projector / tower trains, and whether only adapters (``lora_``) do there."""
    base = tuned.get_base_model() if hasattr(tuned, "get_base_model") else tuned
    params = dict(base.named_parameters())
    out = {}
    for part, names in vision_parts(base).items():
        trained = [n for n in names if params[n].requires_grad]
        out[part] = bool(trained)
        out[f"{part}_adapters_only"] = bool(trained) and all("lora_" in n for n in trained)
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["lora", "full", "freeze"])
@pytest.mark.parametrize("train_vision", ["none", "projector", "tower"])
def test_train_vision_decides_what_trains(tmp_path, vlm_dirs, arch, method, train_vision):
    from tunelab.stages.model import apply_method

    model, processor = build_tiny_vlm(arch)
    config = _config(tmp_path, vlm_dirs[arch], "d.jsonl", f"method.name={method}", f"method.train_vision={train_vision}",
                     *(["method.last_n_blocks=1"] if method == "freeze" else []))
    tuned = apply_method(config, model, processor.tokenizer, [])
    parts = _trainable_parts(tuned.model)
    assert parts["projector"] == (train_vision != "none")
    assert parts["tower"] == (train_vision == "tower")
    if method == "lora" and train_vision != "none":  # adapters on the projector's linear layers, its weights frozen
        assert parts["projector_adapters_only"] and (train_vision == "projector" or parts["tower_adapters_only"])
    language = [n for n in tuned.params if "language_model" in n or "text_model" in n]
    assert language  # the language model trains as the method says, whatever train_vision is


def test_lora_with_explicit_targets_adds_the_projector(vlm_dirs):
    from tunelab.stages.vision import vision_options

    model, _ = build_tiny_vlm("llava")
    config = load_config(None, [f"model={vlm_dirs['llava']}", "data.train=d.jsonl", "method.target_modules=[q_proj, v_proj]",
                                "method.train_vision=projector"])
    targets = vision_options(model, config.method).target_modules
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in peft.named_parameters() if ".lora_A." in n}
    assert any(n.endswith("multi_modal_projector.linear_1") for n in adapted)
    assert any(n.endswith("language_model.layers.0.self_attn.q_proj") for n in adapted)
    assert not any(n.endswith("o_proj") for n in adapted)


def _projector(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "multi_modal_projector" in n or "connector" in n}


@pytest.mark.parametrize("arch, train_vision", [("llava", "none"), ("llava", "projector"), ("idefics3", "projector")])
def test_a_short_run_moves_the_projector_only_when_asked(tmp_path, vlm_dirs, arch, train_vision):
    from tunelab.evaluation.run import load_for_eval
    from tunelab.recipes import sft

    before = _projector(build_tiny_vlm(arch)[0])
    done = sft.main(_config(tmp_path, vlm_dirs[arch], _data(tmp_path), "method.name=lora", f"method.train_vision={train_vision}"))
    assert done.steps == 2
    tuned = load_for_eval(str(done.run_dir)).model  # the saved adapter, reloaded on a fresh base
    after = _projector(tuned.merge_and_unload())
    assert after.keys() == before.keys()
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert bool(moved) == (train_vision == "projector")


def test_full_fine_tuning_moves_the_projector_and_not_the_tower(tmp_path, vlm_dirs):
    from tunelab.recipes import sft

    model = build_tiny_vlm("llava")[0]
    tower = {n: p.detach().clone() for n, p in model.named_parameters() if "vision_tower" in n}
    projector = _projector(model)
    done = sft.main(_config(tmp_path, vlm_dirs["llava"], _data(tmp_path), "method.name=full", "train.lr=1e-3",
                            "method.train_vision=projector"))
    from transformers import AutoModelForImageTextToText

    saved = dict(AutoModelForImageTextToText.from_pretrained(done.run_dir / "model").named_parameters())
    assert all(torch.equal(saved[n], p) for n, p in tower.items())
    assert any(not torch.equal(saved[n], p) for n, p in projector.items())


def test_refusals(tmp_path, vlm_dirs, tiny_llama):
    from tunelab.recipes import sft

    data = _data(tmp_path)
    with pytest.raises(TunelabError, match=r"method\.train_vision=projector: the llama model is text-only"):
        sft.main(_config(tmp_path, tiny_llama, _data(tmp_path, images=False), "method.train_vision=projector"))
    assert not (tmp_path / "run" / "adapter").exists()
    with pytest.raises(TunelabError, match=r"method\.train_vision=tower: no training example has an image"):
        sft.main(_config(tmp_path, vlm_dirs["llava"], _data(tmp_path, images=False), "method.train_vision=tower"))
    for method in ("ia3", "prompt", "prefix", "adapter"):
        with pytest.raises(ConfigError, match=rf"method\.train_vision=projector: method {method} trains the language model only"):
            _config(tmp_path, vlm_dirs["llava"], data, f"method.name={method}", "method.train_vision=projector")
    with pytest.raises(ConfigError, match=r"method\.train_vision: Input should be 'none', 'projector' or 'tower'"):
        _config(tmp_path, vlm_dirs["llava"], data, "method.train_vision=all")
    assert _config(tmp_path, vlm_dirs["llava"], data, "method.name=ia3", "method.train_vision=none").method.name == "ia3"
