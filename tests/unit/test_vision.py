"""VLM contract: tiny random LLaVA and Idefics3 (real transformers architectures) tokenize image records with
only the answers trained, collate pixel values, train with LoRA on the language model only, and refuse what
cannot work (images for a text model, packing with images)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tunelab.data import load_examples
from tunelab.data.collate import collate
from tunelab.data.vision import tokenize_vision_examples
from tunelab.errors import DataError, TunelabError
from tunelab.models.vision import build_tiny_vlm, language_linear_pattern, save_tiny_vlm

# Qwen2-VL is built by models.vision too, but its processor needs torchvision (its video processor), which the
# CPU test environment does not install (PyPI's torchvision wheels are CUDA builds): not in the contract here.
ARCHS = ("llava", "idefics3")
IMAGE_TOKEN = {"llava": "<image>", "idefics3": "<image>", "qwen2_vl": "<|image_pad|>"}


def _data(tmp_path: Path, n: int = 4) -> Path:
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "a.png")
    two = {"messages": [{"role": "user", "content": [{"type": "image", "path": "a.png"}, {"type": "image", "path": "a.png"},
                                                     {"type": "text", "text": "Same?"}]}, {"role": "assistant", "content": "yes"}]}
    one = {"messages": [{"role": "user", "content": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "Colour?"}]},
                        {"role": "assistant", "content": "red"}]}
    text = {"messages": [{"role": "user", "content": "no image"}, {"role": "assistant", "content": "ok"}]}
    rows = ([one, two, text] * n)[:n]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("arch", ARCHS)
def test_only_answers_trained_and_batch_runs(tmp_path, arch):
    model, processor = build_tiny_vlm(arch)
    examples = load_examples([str(_data(tmp_path, 3))])
    tokenized, stats = tokenize_vision_examples(examples, processor)
    decode = processor.tokenizer.decode
    answers = [decode([t for t, label in zip(ex.input_ids, ex.labels) if label != -100]) for ex in tokenized]
    assert answers == ["red<|im_end|>", "yes<|im_end|>", "ok<|im_end|>"]
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[arch])
    counts = [ex.input_ids.count(image_id) for ex in tokenized]
    assert counts[0] > 1 and counts[1] == 2 * counts[0] and counts[2] == 0  # expanded per image, untrained
    batch = collate(tokenized, processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[0] >= 2  # per image (LLaVA), per example with images (Idefics3), per patch (Qwen2-VL)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    assert stats.trained_tokens == sum(label != -100 for ex in tokenized for label in ex.labels)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_targets_the_language_model_only(arch):
    from peft import LoraConfig, get_peft_model

    model, _ = build_tiny_vlm(arch)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=language_linear_pattern(model)))
    trained = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trained and all(("language_model" in n or "text_model" in n) and "lora_" in n for n in trained)


def _config(tmp_path, model, train, *extra):
    from tunelab.resolve import load_config

    return load_config(None, [f"model={model}", f"data.train={train}", f"output_dir={tmp_path / 'run'}", "method.name=lora",
                              "method.r=4", "train.batch_size=2", "train.max_steps=2", "train.warmup_ratio=0",
                              "eval.before=false", "eval.probe=false", "train.defaults=fixed", *extra])


def test_sft_trains_a_tiny_vlm_end_to_end(tmp_path):
    from tunelab.evaluation.run import load_for_eval
    from tunelab.recipes import sft

    from tunelab.resolve import load_config

    model = save_tiny_vlm(tmp_path / "vlm", "llava")
    before = {n: p.clone() for n, p in build_tiny_vlm("llava")[0].named_parameters() if "vision" in n or "projector" in n}
    data = _data(tmp_path)
    config = load_config(None, [f"model={model}", f"data.train={data}", f"data.eval={data}", f"output_dir={tmp_path / 'run'}",
                                "method.name=lora", "train.max_steps=2", "eval.probe=false"])  # the defaults, evaluation on
    done = sft.main(config)
    assert done.steps == 2 and done.train_loss is not None
    report = json.loads((done.run_dir / "eval.json").read_text())
    assert "red" in json.dumps(report)  # the references of the image records were scored
    assert (done.run_dir / "eval_before.json").is_file()
    tuned = load_for_eval(str(done.run_dir)).model
    after = dict(tuned.get_base_model().named_parameters())
    assert all(torch.equal(after[n], p) for n, p in before.items())  # tower and projector untouched
    from tunelab.export.pipeline import export_model
    from tunelab.merging import merge_run
    from tunelab.models.vision import load_processor

    report = merge_run(done.run_dir, tmp_path / "merged")
    assert report["verification"]["passed"]
    assert load_processor(str(tmp_path / "merged")).image_processor is not None
    export_model(done.run_dir, "hf", out=tmp_path / "hf")
    assert load_processor(str(tmp_path / "hf")).tokenizer.chat_template == load_processor(str(model)).tokenizer.chat_template


def test_refused_before_training(tmp_path, tiny_llama):
    from tunelab.recipes import sft

    data = _data(tmp_path)
    with pytest.raises(DataError, match=r"d\.jsonl:1: .*no vision tower"):
        sft.main(_config(tmp_path, tiny_llama, data))
    assert not (tmp_path / "run" / "adapter").exists()
    with pytest.raises(TunelabError, match="packing"):
        sft.main(_config(tmp_path, save_tiny_vlm(tmp_path / "vlm", "idefics3"), data, "train.packing=true"))


def test_gguf_export_of_a_vlm_is_refused(tmp_path):
    from tunelab.export.source import open_source

    model = save_tiny_vlm(tmp_path / "vlm", "idefics3")
    with pytest.raises(TunelabError, match=r"vision-language model \(idefics3\).*mmproj.*--format hf"):
        open_source(model, "gguf")
    assert open_source(model, "hf").path == model


def test_inspect_shows_expanded_placeholders_untrained(tmp_path):
    from rich.console import Console

    from tunelab.recipes import sft

    model = save_tiny_vlm(tmp_path / "vlm", "llava")
    console = Console(record=True, width=200)
    sft.inspect(_config(tmp_path, model, _data(tmp_path)), 1, console)
    text = console.export_text()
    assert "<image>×16" in text and text.count("<image>×16") == 2
