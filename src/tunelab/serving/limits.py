"""What one request may ask of the server, so that no single client can exhaust its memory or stall everyone.

Every limit, its default and the ``tunelab serve`` flag that changes it:

===========================  ===============================  =====================  ===============================
limit                        default                          flag                   refusal
===========================  ===============================  =====================  ===============================
request body size            4 MiB (4194304 bytes)            ``--max-body-bytes``   413, counted while reading
prompts per request          64                               ``--max-prompts``      400, ``param: prompt``
rows per request (prompts    128                              ``--max-rows``         400, ``param: n``
x ``n``)
``n``                        16                               (fixed)                422, ``param: n``
``stop`` strings             4, each at most 512 characters   (fixed, as OpenAI)     422, ``param: stop``
prompt characters            context x 16 (checked before     (fixed)                400, ``context_length_exceeded``
                             tokenizing)
prompt + ``max_tokens``      the model's context              (the model)            400, ``context_length_exceeded``
``seed``                     a signed 64-bit integer          (fixed)                422, ``param: seed``
``tools``, ``response_       128 tools; 64 KiB of JSON each;  (fixed,                400, ``param: tools`` or
format``                     a grammar within llguidance's    ``serving.structured``) ``response_format``
                             size and lexer-fuel bounds
text fields                  valid Unicode (no lone           (fixed)                400, the field named
                             surrogates such as ``\\ud800``)
requests waiting or          64                               ``--max-pending``      429 with ``Retry-After``
decoding
rows decoded together        16                               ``--max-batch``        (queued)
drain on Ctrl-C / SIGTERM    30 s, then running jobs are      ``--drain-seconds``
                             cancelled
===========================  ===============================  =====================  ===============================

The body bound is a small pure-ASGI middleware: Starlette and FastAPI have none (uvicorn only bounds
headers), and it must count bytes as they arrive, so a chunked body without ``Content-Length`` is cut off too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tunelab.serving.protocol import APIError

CHARS_PER_TOKEN = 16  # no tokenizer spends fewer than one token on 16 characters of ordinary text
GRACE_SECONDS = 5.0  # after the drain, how long the decoding thread gets to end its current step


@dataclass(frozen=True)
class Limits:
    """The per-request bounds of one server (see the module docstring for what each refusal looks like).

    Attributes:
        max_body_bytes: Largest request body, in bytes.
        max_prompts: Prompts one ``/v1/completions`` request may send.
        max_rows: Prompts times ``n`` one request may ask for.
        drain_seconds: On shutdown, how long open requests may still run before they are cancelled.
    """

    max_body_bytes: int = 4 * 1024 * 1024
    max_prompts: int = 64
    max_rows: int = 128
    drain_seconds: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompts", "max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)!r}: use a positive integer")
        if self.drain_seconds < 0:
            raise ValueError(f"drain_seconds {self.drain_seconds!r}: use 0 or more seconds")

    @property
    def stop_seconds(self) -> float:
        """How long the lifespan waits for the decoding thread once uvicorn has drained (or cancelled) the requests."""
        return min(self.drain_seconds, GRACE_SECONDS)

    def check_rows(self, prompts: int, n: int) -> None:
        """Refuse a request of more than ``max_prompts`` prompts or ``max_rows`` prompts times ``n``.

        Raises:
            APIError: 400 naming ``prompt`` or ``n``.
        """
        if prompts > self.max_prompts:
            raise APIError(400, f"prompt has {prompts} prompts; at most {self.max_prompts} are served per request "
                                "(--max-prompts): split them over several requests", param="prompt")
        if prompts * n > self.max_rows:
            raise APIError(400, f"{prompts} prompts x n={n} asks for {prompts * n} completions; at most {self.max_rows} "
                                "are served per request (--max-rows): lower n or send fewer prompts", param="n")


def check_prompt_chars(chars: int, context: int, param: str) -> None:
    """Refuse a prompt whose length in characters alone shows it cannot fit the context, before tokenizing it.

    Raises:
        APIError: 400 ``context_length_exceeded`` naming ``param``.
    """
    bound = context * CHARS_PER_TOKEN
    if chars > bound:
        raise APIError(400, f"{param}: the prompt has {chars} characters, more than the model's context of {context} "
                            f"tokens can hold (at most {bound} characters are read): shorten the prompt",
                       param=param, code="context_length_exceeded")


class BodyLimitMiddleware:
    """ASGI middleware answering 413 (OpenAI's error body) to a request body over ``max_bytes``.

    A declared ``Content-Length`` over the bound is refused before any byte is read; otherwise the body is read
    chunk by chunk, counting, and refused as soon as the count passes the bound (the rest is never read), then
    handed to the application in one piece, as FastAPI would have buffered it anyway.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None  # the client left before sending its body: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # later calls wait for the client's disconnect, as before
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        message = (f"the request body is larger than {self.max_bytes} bytes, the most this server accepts "
                   "(--max-body-bytes): send fewer or shorter prompts per request")
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
