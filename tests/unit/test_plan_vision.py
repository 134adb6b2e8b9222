"""``tunelab plan`` on tiny VLMs: the tower and projector are counted exactly (as the built model has them), what
``method.train_vision`` trains is trainable and costs its gradients and optimizer states, and the image tokens per
example are the processor's."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from tunelab.methods import count_parameters
from tunelab.models.vision import build_tiny_vlm, save_tiny_vlm, vision_parts
from tunelab.planning import plan, print_plan
from tunelab.planning.vision import load_vision
from tunelab.resolve import load_config


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory) -> dict[str, Path]:
    return {arch: save_tiny_vlm(tmp_path_factory.mktemp(arch), arch) for arch in ("llava", "idefics3")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Three examples: one image, two images, none."""
    folder = tmp_path_factory.mktemp("data")
    Image.new("RGB", (40, 30), (255, 0, 0)).save(folder / "a.png")
    image = {"type": "image", "path": "a.png"}
    rows = [[image, {"type": "text", "text": "Colour?"}], [image, image, {"type": "text", "text": "Same?"}], "no image"]
    path = folder / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": c}, {"role": "assistant", "content": "red"}]})
                            + "\n" for c in rows), encoding="utf-8")
    return path


def _config(model: Path, data: Path, *overrides: str):
    return load_config(None, [f"model={model}", f"data.train={data}", "train.batch_size=2", "data.max_length=128", *overrides])


def _parts(arch: str) -> dict[str, int]:
    model = build_tiny_vlm(arch)[0]
    params = dict(model.named_parameters())
    return {part: sum(params[n].numel() for n in names) for part, names in vision_parts(model).items()}


@pytest.mark.parametrize("arch, per_image, positions", [("llava", 16, 1), ("idefics3", 4, 4)])
def test_image_tokens_and_vision_parameters_are_the_models(vlm_dirs, data, arch, per_image, positions):
    vision = load_vision(_config(vlm_dirs[arch], data))
    assert vision.shape.params == _parts(arch)
    assert vision.shape.positions_per_token == positions  # Idefics3: 16 patches pixel-shuffled into 4 tokens
    images = vision.images
    assert (images.examples, images.of, images.measured, images.images) == (2, 3, 2, 2)
    assert (images.tokens_max, images.tokens_mean) == (2 * per_image, 1.5 * per_image)


def test_full_fine_tuning_counts_every_parameter_and_trains_what_train_vision_says(vlm_dirs, data):
    total = count_parameters(build_tiny_vlm("llava")[0])[1]
    parts = _parts("llava")
    plans = {tv: plan(_config(vlm_dirs["llava"], data, "method.name=full", f"method.train_vision={tv}"), "cpu")
             for tv in ("none", "projector", "tower")}
    assert all(p.total_params == total for p in plans.values())  # the language model's table + the tower + the projector
    assert plans["tower"].trainable_params == total
    assert plans["projector"].trainable_params == total - parts["tower"]
    assert plans["none"].trainable_params == total - parts["tower"] - parts["projector"]
    # float32 weights: each trained parameter costs two AdamW states of 4 bytes
    states = {tv: p.memory.optimizer_states for tv, p in plans.items()}
    assert states["projector"] - states["none"] == 8 * parts["projector"]
    assert states["tower"] - states["projector"] == 8 * parts["tower"]
    assert all(p.memory.weights == 4 * total for p in plans.values())


def test_lora_adapts_the_vision_linears_and_keeps_their_activations(vlm_dirs, data):
    plans = {tv: plan(_config(vlm_dirs["idefics3"], data, "method.r=4", f"method.train_vision={tv}"), "cpu")
             for tv in ("none", "projector", "tower")}
    # the projector is one linear layer (4*32 -> 64): rank 4 adds 4*(128 + 64) parameters
    assert plans["projector"].trainable_params - plans["none"].trainable_params == 4 * (128 + 64)
    acts = {tv: p.memory.phases["backward (loss)"] for tv, p in plans.items()}
    assert acts["none"] < acts["projector"] < acts["tower"]
    out = Console(file=io.StringIO(), width=300)
    print_plan(plans["projector"], out)
    text = out.file.getvalue()
    tower = _parts("idefics3")["tower"]
    assert f"tower {tower:,} parameters, frozen" in text and "projector 8,192 parameters, trained (LoRA adapters" in text
    assert "6 image tokens per image example on average, at most 8 (2 images at most)" in text
    assert "counted by the processor on 2 of the 2 training examples with images" in text


def test_a_text_model_has_no_image_side(tiny_llama, data):
    p = plan(_config(tiny_llama, data), "cpu")
    assert p.vision_notes is None and load_vision(_config(tiny_llama, data)) is None
