"""``tunelab serve`` answers OpenAI chat requests with image parts for a vision-language model, the same
answer ``vision_answers`` (evaluation) gives, and refuses images it cannot take with a 400."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from PIL import Image


def _data_url(colour) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_image_request_served_like_evaluation(tmp_path):
    from openai import OpenAI

    from tunelab.evaluation.vision import vision_answers
    from tunelab.models.vision import save_tiny_vlm
    from tunelab.serving.app import create_app
    from tunelab.serving.models import Registry
    from tunelab.serving.server import BackgroundServer

    model = save_tiny_vlm(tmp_path / "vlm", "llava")
    registry = Registry(str(model), base_id="vlm")
    url = _data_url((255, 0, 0))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "Colour?"}]}]
    with BackgroundServer(create_app(registry)) as server:
        client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="vlm", messages=messages, temperature=0, max_tokens=5)
        expected = vision_answers(registry.get("vlm").backbone.base,
                                  [[{"role": "user", "content": [{"type": "image", "image": url},
                                                                 {"type": "text", "text": "Colour?"}]}]], max_new_tokens=5)
        assert reply.choices[0].message.content.strip() == expected[0]
        assert reply.usage.prompt_tokens > 16  # the 16 image tokens of the tiny LLaVA counted
        for bad, match in (("file:///etc/passwd", "data:image"), ("data:image/png;base64,AAAA", "not an image")):
            wrong = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": bad}}]}]
            with pytest.raises(openai.BadRequestError, match=match):
                client.chat.completions.create(model="vlm", messages=wrong, max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="stream"):
            client.chat.completions.create(model="vlm", messages=messages, max_tokens=2, stream=True)
