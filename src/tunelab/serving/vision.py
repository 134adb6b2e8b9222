"""Chat requests with image parts (OpenAI's ``image_url`` shape, data: URLs) for a served VLM.

The continuous-batching engine decodes token ids only; a VLM's prompt also carries pixel values that the
processor makes, so an image request is answered apart from it: one conversation, greedy or sampled by
``transformers``' ``generate`` under the registry lock (as every decode is), no streaming, tools or grammar.
"""

from __future__ import annotations

import torch

from tunelab.data.images import image_references, load_image
from tunelab.evaluation.vision import processor_of
from tunelab.generation.settings import Completion
from tunelab.models.vision import is_vision_config
from tunelab.serving.protocol import APIError, chat_response


def _refuse_unsupported(body) -> None:
    asked = {"stream": bool(body.stream), "n > 1": body.n > 1, "tools": bool(getattr(body, "tools", None)),
             "response_format": bool(body.response_format)}
    unsupported = [name for name, on in asked.items() if on]
    if unsupported:
        raise APIError(400, f"requests with images do not support {', '.join(unsupported)} yet; send them without",
                       param="messages")


def _generate(model, conversation: list[dict], max_new_tokens: int, temperature: float | None) -> Completion:
    processor = processor_of(model)
    tokenizer = processor.tokenizer
    prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    images = [load_image(ref) for ref in image_references(conversation)]
    inputs = processor(text=[prompt], images=images, return_tensors="pt").to(next(model.parameters()).device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **sampling)
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    stopped = bool(ids) and ids[-1] == tokenizer.eos_token_id
    return Completion(ids, tokenizer.decode(ids, skip_special_tokens=True), "stop" if stopped else "length",
                      int(inputs["input_ids"].shape[1]))


def answer_with_images(registry, served, body, conversation: list[dict], default_max: int) -> dict:
    """The ``chat.completion`` body for a conversation with images (blocking: run it in a thread)."""
    _refuse_unsupported(body)
    with registry.lock, served.active() as model:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not is_vision_config(base.config):
            raise APIError(400, f"model {served.id!r} has no vision tower; send text only or serve a vision-language model",
                           param="messages")
        completion = _generate(model, conversation, body.max_completion_tokens or body.max_tokens or default_max,
                               body.temperature)
    return chat_response(served.id, [completion])
