"""The OpenAI wire format the server speaks: request bodies (pydantic), error bodies, response bodies.

Only the fields this server acts on are declared; other fields clients send are ignored, as OpenAI-compatible
servers do. Request bodies are checked by pydantic (wrong types answer 422); what pydantic cannot see
(message order, an unknown model, a prompt plus ``max_tokens`` beyond the context) raises :class:`APIError`.
Bounds that keep one request from stalling the server (``stop`` strings, ``seed``'s range, ``n``) are declared
here; the others are in ``serving.limits``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Literal, Union

from pydantic import BaseModel, Field, field_validator

from tunelab.errors import TunelabError
from tunelab.generation import Completion, SamplingSettings

MAX_STOP = 4  # OpenAI's bound: each stop string is searched for after every generated token
MAX_STOP_CHARS = 512
INT64 = 2**63  # seeds are 64-bit, as torch's generators and vLLM take them


class APIError(Exception):
    """A request the server refuses, answered with ``status`` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """``{"error": {"message", "type", "param", "code"}}``, the shape OpenAI's clients parse."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    """OpenAI's image part; a served VLM answers it (``tunelab.serving.vision``)."""

    type: Literal["image_url"]
    image_url: ImageUrl


class CalledFunction(BaseModel):
    name: str
    arguments: Union[str, dict, None] = None  # OpenAI sends a JSON string; an object is taken too


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[Union[TextPart, ImagePart]], None] = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content if isinstance(part, TextPart))
        return self.content or ""


class SamplingFields(BaseModel):
    """What chat and text completions share."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict | None = None

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, stop: Union[str, list[str], None]) -> Union[str, list[str], None]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"{len(stops)} stop strings were sent; at most {MAX_STOP} are allowed")
        longest = max(map(len, stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"a stop string has {longest} characters; at most {MAX_STOP_CHARS} are allowed")
        return stop

    def wants_usage_in_stream(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def settings(self, prompt_tokens: int, context: int, default_max: int) -> SamplingSettings:
        """The decoding settings, with ``max_tokens`` checked against the room the prompt leaves in the context.

        Raises:
            APIError: 400 when prompt plus ``max_tokens`` exceed the context, or a stop string is empty.
        """
        room = context - prompt_tokens
        asked = self.max_completion_tokens or self.max_tokens
        if room < 1 or (asked is not None and asked > room):
            raise APIError(400, f"max_tokens {asked}: the prompt has {prompt_tokens} tokens and the model's context is "
                                f"{context}, so at most {max(room, 0)} can be generated; shorten the prompt or lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        temperature = 1.0 if self.temperature is None else self.temperature  # OpenAI's default
        try:
            return SamplingSettings(temperature=temperature, top_p=1.0 if self.top_p is None else self.top_p,
                                    max_new_tokens=asked or min(default_max, room), seed=self.seed, stop=tuple(stop))
        except TunelabError as exc:
            raise APIError(400, str(exc), param="stop") from None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    tools: list[Any] | None = None  # checked by serving.structured (400 with what is wrong)
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None

    def conversation(self) -> list[dict]:
        """The messages as the chat template takes them (tool calls with their arguments as objects, tool results
        with the id of the call they answer), checked for what a template cannot answer.

        Raises:
            APIError: 400 when there are no messages, a system message is not first, the last is neither the
                user's nor a tool result, or an earlier call's arguments are not a JSON object.
        """
        if not self.messages:
            raise APIError(400, "messages is empty: send at least one user message", param="messages")
        out = [_template_message(n, m) for n, m in enumerate(self.messages)]
        if any(m["role"] == "system" for m in out[1:]):
            raise APIError(400, "messages: a system message may only come first; merge it into the first one", param="messages")
        if out[-1]["role"] not in ("user", "tool"):
            raise APIError(400, f"messages: the last message is the {out[-1]['role']}'s; end with a user message or a "
                                "tool result (the assistant's reply is what is generated)", param="messages")
        return out


def _template_message(n: int, message: ChatMessage) -> dict:
    """One message as ``tunelab.data.tool_render.render_chat`` takes it."""
    from tunelab.data.tools import parse_calls

    out = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
    if isinstance(message.content, list) and any(isinstance(p, ImagePart) for p in message.content):
        out["content"] = [{"type": "text", "text": p.text} if isinstance(p, TextPart) else
                          {"type": "image", "image": check_image_url(p.image_url.url, f"messages.{n}.content.{k}")}
                          for k, p in enumerate(message.content)]
    if message.tool_calls:
        errors: list[str] = []
        calls = parse_calls(n, [c.model_dump(exclude_none=True) for c in message.tool_calls], errors)
        if calls is None:
            raise APIError(400, f"messages.{n}.tool_calls: " + "; ".join(errors), param=f"messages.{n}.tool_calls")
        out["tool_calls"] = calls
    if message.role == "tool" and message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def check_image_url(url: str, where: str) -> str:
    """A request's image URL when it is a readable ``data:image/...;base64`` URL; else 400 saying why."""
    if not url.startswith("data:image/"):
        raise APIError(400, f"{where}: the server takes images as data:image/...;base64 URLs (it does not read files "
                            "or fetch URLs); encode the image into the request", param=where)
    from tunelab.data.images import check_image

    problem = check_image(url)
    if problem:
        raise APIError(400, f"{where}: {problem}", param=where)
    return url


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str]]

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts:
            raise APIError(400, "prompt is an empty list: send a string or a list of strings", param="prompt")
        return prompts


class LoadLoraRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoraRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None


def require_text(body: BaseModel) -> None:
    """Refuse a body holding a string that is not valid Unicode text: JSON can carry a lone surrogate
    (``"\\ud800"``), which no tokenizer or UTF-8 encoder takes.

    Raises:
        APIError: 400 naming the field (``messages.0.content``).
    """
    where = _bad_text(body.model_dump(), "")
    if where is not None:
        raise APIError(400, f"{where or 'body'}: the text holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is "
                            "not valid Unicode; send well-formed text (pair the surrogate or remove it)", param=where or None)


def _bad_text(value: Any, path: str) -> str | None:
    """The dotted path of the first string in ``value`` (keys included) that UTF-8 cannot encode, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and _bad_text(key, where) is not None:
            return where.encode("utf-8", "backslashreplace").decode()  # the key itself cannot be echoed as it is
        if (found := _bad_text(item, where)) is not None:
            return found
    return None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(completions: list[Completion]) -> dict:
    """Token counts of a response: every prompt once per choice made from it, as OpenAI counts them."""
    prompt = sum(c.prompt_tokens for c in completions)
    generated = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def chat_response(model_id: str, completions: list[Completion],
                  answer: Callable[[Completion], tuple[dict, str]] | None = None) -> dict:
    """A ``chat.completion`` body: one choice per completion (the ``n`` samples of one conversation); ``answer``
    makes a completion's message and finish reason (tool calls read out of its text), default its text."""
    answer = answer or (lambda c: ({"role": "assistant", "content": c.text}, c.finish_reason))
    choices = [{"index": i, "message": message, "logprobs": None, "finish_reason": finish}
               for i, (message, finish) in enumerate(map(answer, completions))]
    prompt = completions[0].prompt_tokens if completions else 0
    counted = usage(completions)
    counted.update(prompt_tokens=prompt, total_tokens=prompt + counted["completion_tokens"])  # one conversation
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model_id,
            "choices": choices, "usage": counted}


def completion_response(model_id: str, completions: list[Completion], n: int) -> dict:
    """A ``text_completion`` body: ``n`` choices per prompt, prompt after prompt."""
    choices = [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
               for i, c in enumerate(completions)]
    counted = usage(completions)
    prompt = sum(c.prompt_tokens for c in completions[::n])
    counted.update(prompt_tokens=prompt, total_tokens=prompt + counted["completion_tokens"])
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model_id,
            "choices": choices, "usage": counted}


def chat_chunk(chunk_id: str, model_id: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def stream_chunk(chat: bool, chunk_id: str, model_id: str, text: str | None, finish: str | None = None) -> dict:
    """One streamed event: a text delta (``text``) or the closing one (``text`` None, with ``finish``)."""
    if chat:
        return chat_chunk(chunk_id, model_id, {} if text is None else {"content": text}, finish)
    return {"id": chunk_id, "object": "text_completion", "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}


def usage_chunk(chat: bool, chunk_id: str, model_id: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last event of a stream that asked for ``stream_options.include_usage``: no choices, the token counts."""
    counted = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
               "total_tokens": prompt_tokens + completion_tokens}
    return {"id": chunk_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model_id, "choices": [], "usage": counted}
