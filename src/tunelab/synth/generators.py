"""The model that writes the questions and answers: a local one, or any OpenAI-compatible endpoint.

* **local**: an embedded alias, HF folder, ``.gguf``, hub id or tunelab run directory, loaded as
  evaluation loads it and decoded through :mod:`tunelab.generation` in batches (``datagen.generate``).
* **endpoint**: ``http(s)://HOST:PORT/v1`` through the official ``openai`` client (``tunelab serve``,
  vLLM, llama.cpp's server, a hosted API); one chat completion per prompt, a few in flight at once. The
  model is ``--generator-model`` or else the first the endpoint lists; the key is ``OPENAI_API_KEY``.

Both return one text per conversation and describe themselves for the provenance.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from tunelab.errors import TunelabError
from tunelab.generation import SamplingSettings

Reply = tuple[str, str]
"""(text, finish reason: ``stop`` or ``length``)"""


class Generator(Protocol):
    provenance: dict[str, Any]

    def complete(self, conversations: Sequence[list[dict]], settings: SamplingSettings) -> list[Reply]:
        ...


def is_endpoint(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


class LocalGenerator:
    def __init__(self, spec: str, batch_size: int = 16):
        from tunelab.datagen.generate import load_teacher

        self.teacher = load_teacher(spec)
        self.batch_size = batch_size
        self.provenance = {"kind": "local", "model": self.teacher.provenance}
        self.tokenizer = self.teacher.loaded.tokenizer

    def complete(self, conversations, settings) -> list[Reply]:
        from tunelab.datagen.generate import complete

        done = complete(self.teacher.loaded, conversations, settings, batch_size=self.batch_size)
        return [(c.text, c.finish_reason) for c in done]


class EndpointGenerator:
    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, parallel: int = 4):
        try:
            import openai
        except ImportError:
            raise TunelabError("an endpoint generator needs the openai client; install it with: pip install 'tunelab[synth]'") from None
        self.openai = openai
        self.client = openai.OpenAI(base_url=url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "unused", max_retries=2)
        self.url, self.parallel = url, parallel
        self.model = model or self._first_model()
        self.provenance = {"kind": "endpoint", "url": url, "model": self.model}

    def _call(self, what: str, fn):
        try:
            return fn()
        except self.openai.APIConnectionError:
            raise TunelabError(f"--generator {self.url}: cannot connect; start the server (e.g. tunelab serve MODEL) "
                               "or check the address") from None
        except self.openai.APIStatusError as error:
            raise TunelabError(f"--generator {self.url}: {what} failed with HTTP {error.status_code}: {error.message}") from None

    def _first_model(self) -> str:
        models = self._call("listing models", lambda: list(self.client.models.list()))
        if not models:
            raise TunelabError(f"--generator {self.url}: the endpoint lists no model; name one with --generator-model")
        return models[0].id

    def _one(self, conversation: list[dict], settings: SamplingSettings, index: int) -> Reply:
        extra = {"seed": settings.seed + index} if settings.seed is not None else {}
        response = self._call("a chat completion", lambda: self.client.chat.completions.create(
            model=self.model, messages=conversation, temperature=settings.temperature, top_p=settings.top_p,
            max_tokens=settings.max_new_tokens, stop=list(settings.stop) or None, **extra))
        choice = response.choices[0]
        return choice.message.content or "", "length" if choice.finish_reason == "length" else "stop"

    def complete(self, conversations, settings) -> list[Reply]:
        with ThreadPoolExecutor(self.parallel) as pool:
            return list(pool.map(lambda pair: self._one(pair[1], settings, pair[0]), enumerate(conversations)))


def open_generator(spec: str, model: str | None = None, batch_size: int = 16) -> Generator:
    """The generator ``spec`` names (a URL is an endpoint, anything else a local model)."""
    return EndpointGenerator(spec, model) if is_endpoint(spec) else LocalGenerator(spec, batch_size)
