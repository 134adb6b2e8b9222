"""Generation and exact-match accuracy of a VLM on image records, through the model's processor (greedy).

The text evaluation renders prompts with the tokenizer alone; a VLM's prompt also needs its pixel values, so
the processor renders both. The processor is the base model's (a run's adapter or weights do not change it),
found from the model's ``name_or_path``.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from tunelab.data.images import image_references, load_image
from tunelab.data.records import Example
from tunelab.models.vision import load_processor


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@lru_cache(maxsize=4)
def _processor(path: str):
    return load_processor(path)


def processor_of(model):
    """The processor saved with the model's base weights."""
    return _processor(str(_base(model).config.name_or_path))


@torch.no_grad()
def vision_answers(model, conversations: list[list[dict]], *, max_new_tokens: int = 128, processor=None) -> list[str]:
    """Greedy answers to conversations that end with a user turn, images included (one at a time)."""
    processor = processor or processor_of(model)
    tokenizer = processor.tokenizer
    model.eval()
    device = next(model.parameters()).device
    answers = []
    for conversation in conversations:
        prompt = tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)
        images = [load_image(ref) for ref in image_references(conversation)]
        inputs = processor(text=[prompt], images=images or None, return_tensors="pt").to(device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def vision_accuracy(model, processor, examples: list[Example], *, max_new_tokens: int = 8) -> dict:
    """Share of examples whose generated answer equals the reference (stripped, case-folded).

    Returns:
        ``{"accuracy", "n", "predictions"}`` with one ``(prediction, reference)`` pair per example.
    """
    answers = vision_answers(model, [list(e.messages[:-1]) for e in examples], max_new_tokens=max_new_tokens,
                             processor=processor)
    predictions = [(a, str(e.messages[-1]["content"]).strip()) for a, e in zip(answers, examples)]
    right = sum(p.lower() == r.lower() for p, r in predictions)
    return {"accuracy": right / len(predictions) if predictions else 0.0, "n": len(predictions), "predictions": predictions}
