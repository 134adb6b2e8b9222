"""Exact-match accuracy of a VLM on image records, generating through the model's processor (greedy).

The text evaluation renders prompts with the tokenizer alone; a VLM's prompt also needs its pixel values, so
this asks the processor for both. Kept separate until the text evaluation takes image records.
"""

from __future__ import annotations

import torch

from tunelab.data.images import image_references, load_image
from tunelab.data.records import Example


@torch.no_grad()
def vision_accuracy(model, processor, examples: list[Example], *, max_new_tokens: int = 8) -> dict:
    """Share of examples whose generated answer equals the reference (stripped, case-folded).

    Returns:
        ``{"accuracy", "n", "predictions"}`` with one ``(prediction, reference)`` pair per example.
    """
    model.eval()
    tokenizer = processor.tokenizer
    predictions = []
    for example in examples:
        prompt = tokenizer.apply_chat_template(list(example.messages[:-1]), tokenize=False, add_generation_prompt=True)
        images = [load_image(ref) for ref in image_references(example.messages)]
        inputs = processor(text=[prompt], images=images or None, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        predictions.append((text, str(example.messages[-1]["content"]).strip()))
    right = sum(p.lower() == r.lower() for p, r in predictions)
    return {"accuracy": right / len(predictions) if predictions else 0.0, "n": len(predictions), "predictions": predictions}
