"""The OpenAI-compatible HTTP API (FastAPI): models, chat and text completions, adapter loading, health, metrics.

Routes and bodies follow OpenAI's API and, for adapters, vLLM's (``/v1/models`` entries carry ``parent`` and
``root``; ``POST /v1/load_lora_adapter`` takes ``lora_name`` and ``lora_path``). Every refusal has OpenAI's
error body, so the official clients raise their usual exceptions: 400 for a request that cannot be answered,
401 for a missing or wrong API key, 404 for an unknown model, 413 for a body over the size bound, 422 for
wrong types, 429 (with ``Retry-After``) when the queue is full.

Chat requests may carry ``tools``, ``tool_choice``, ``parallel_tool_calls`` and ``response_format``
(``serving.structured`` decides the rendering and the grammar, ``serving.toolcalls`` reads calls out of the
answers, whole or streamed).

In front of the routes: :class:`tunelab.webguard.HostGuardMiddleware` (a ``Host`` the server is not reached by
is a 400, a browser ``Origin`` of another site on a POST a 403: DNS rebinding), then the body bound of
``serving.limits``, whose docstring lists every limit, its default and its flag. ``/metrics`` counts requests
by route template (``/v1/chat/completions``; unknown paths as ``unmatched``), so its size stays bounded, and
wants the API key as ``/v1`` does.
"""

from __future__ import annotations  # FastAPI resolves the route annotations from this module's globals

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from tunelab.data.images import has_images
from tunelab.errors import TunelabError
from tunelab.generation.constrain import Grammar
from tunelab.serving.limits import BodyLimitMiddleware, Limits, check_prompt_chars
from tunelab.serving.metrics import UNMATCHED, Metrics
from tunelab.serving.models import Registry, ServedModel
from tunelab.serving.reasoning import ReasoningStream, opens_reasoning
from tunelab.serving.protocol import (APIError, ChatRequest, CompletionRequest, LoadLoraRequest, SamplingFields,
                                      UnloadLoraRequest, chat_chunk, chat_response, completion_response, error_body,
                                      new_id, require_text, stream_chunk, usage_chunk)
from tunelab.serving.scheduler import Job, ModelGone, QueueFull, ShutDown
from tunelab.serving.structured import Plan, plan_for, render
from tunelab.serving.toolcalls import ToolStream, answer_of
from tunelab.webguard import HostGuard, HostGuardMiddleware

_DONE = object()
_KEYED = ("/v1", "/metrics")  # the paths that want the API key when one is set


class _ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error may quote what the client sent, which need not be valid UTF-8 text."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content).encode()


def create_app(registry: Registry, *, api_key: str | None = None, max_pending: int = 64, max_batch_rows: int = 16,
               default_max_tokens: int = 256, batching: str = "continuous", mix_adapters: bool = True,
               limits: Limits | None = None, host: str = "127.0.0.1", allowed_hosts: tuple[str, ...] = ()):
    """The FastAPI application serving ``registry``'s models.

    Args:
        registry: The loaded base and adapters.
        api_key: When set, every ``/v1`` request must send ``Authorization: Bearer <api_key>``.
        max_pending: Requests waiting or decoding at most; more are answered 429.
        max_batch_rows: Prompts decoded together at most.
        default_max_tokens: Completion length when a request gives no ``max_tokens`` (bounded by the context).
        batching: ``continuous`` (requests join and leave the running batch between decode steps, LoRA adapters
            of one base in one batch: ``serving.continuous``) or ``dynamic`` (whole ``generate`` calls per
            model: ``serving.scheduler``).
        mix_adapters: With continuous batching, rows of different LoRA adapters of one base in one batch.
        limits: Per-request bounds (body size, prompts, rows) and the drain on shutdown; default ``Limits()``.
        host: The address or name the server is bound to; requests must reach it by it, an IP literal,
            ``localhost`` or one of ``allowed_hosts`` (``Host`` header).
        allowed_hosts: Further names the server is reached by (``--allowed-host``); ``*`` allows any.
    """
    limits = limits or Limits()
    if batching not in ("continuous", "dynamic"):
        raise TunelabError(f"batching {batching!r}: use continuous or dynamic")
    if batching == "continuous":
        from tunelab.serving.continuous import ContinuousScheduler as Scheduler
    else:
        from tunelab.serving.scheduler import Scheduler
    extra = {"mix_adapters": mix_adapters} if batching == "continuous" else {}
    scheduler = Scheduler(registry, max_pending=max_pending, max_batch_rows=max_batch_rows, **extra)
    metrics = Metrics(lambda: scheduler.depth, registry.adapter_count)
    scheduler.on_batch = lambda rows, seconds: metrics.batch_rows.observe(rows)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        # uvicorn drained the requests for drain_seconds and cancelled the rest; what the decoding thread still
        # holds belongs to no one, so it gets a few seconds to end its step before it is cancelled.
        await asyncio.to_thread(scheduler.stop, limits.stop_seconds)

    app = FastAPI(title="tunelab serve", lifespan=lifespan)
    app.state.registry, app.state.scheduler, app.state.metrics = registry, scheduler, metrics
    app.state.default_max_tokens, app.state.limits = default_max_tokens, limits
    _install_errors_and_auth(app, api_key, metrics)
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes)
    app.add_middleware(HostGuardMiddleware, guard=HostGuard(host, allowed_hosts))  # added last: runs first
    _add_info_routes(app)
    _add_completion_routes(app)
    _add_adapter_routes(app)
    return app


def _install_errors_and_auth(app, api_key: str | None, metrics: Metrics) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _ErrorResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _ErrorResponse(error_body("the request body is not valid JSON"), status_code=400)
        if any(tuple(e.get("loc", ())) == ("body",) for e in errors):  # a list, a string, or no body at all
            return _ErrorResponse(error_body("the request body must be a JSON object (Content-Type: application/json)"),
                                  status_code=400)
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}" for e in errors)
        return _ErrorResponse(error_body(message or "invalid request", param=where or None), status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _ErrorResponse(error_body(str(exc.detail), code=str(exc.status_code)), status_code=exc.status_code)

    @app.middleware("http")
    async def guard_and_count(request: Request, call_next):
        started = time.monotonic()
        route = _route_template(app, request.scope)
        if api_key and request.url.path.startswith(_KEYED):
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {api_key}".encode()):
                metrics.observe_request(route, "", 401)
                return _ErrorResponse(error_body("missing or wrong API key: send 'Authorization: Bearer <key>' with "
                                                 "the key the server was started with (--api-key)",
                                                 code="invalid_api_key"), status_code=401)
        try:
            response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 with a body; the server keeps serving
            response = _ErrorResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", type="server_error"),
                                      status_code=500)
        model = getattr(request.state, "model", "")
        metrics.observe_request(route, model, response.status_code, time.monotonic() - started)
        return response


def _route_template(app, scope) -> str:
    """The path template of the route ``scope`` matches (``/v1/models``), else ``unmatched``: metric labels
    must come from a bounded set, never from the raw path a client chose."""
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:  # PARTIAL: the path matches, the method does not (405)
            return route.path
    return UNMATCHED


def _add_info_routes(app) -> None:
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = app.state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(m) for m in app.state.registry.entries()]}


def _model_card(model: ServedModel) -> dict:
    return {"id": model.id, "object": "model", "created": model.created, "owned_by": "tunelab", "root": model.root,
            "parent": model.parent, "max_model_len": model.context}


def _lookup(app, request, name: str) -> ServedModel:
    served = app.state.registry.get(name)
    if served is None:
        known = ", ".join(m.id for m in app.state.registry.entries())
        raise APIError(404, f"model {name!r} does not exist; served models: {known}", param="model", code="model_not_found")
    request.state.model = served.id
    return served


def _prompt_length(served: ServedModel, prompt: Any) -> int:
    """Tokens of the rendered prompt; a conversation the chat template refuses is the client's mistake (400).

    A prompt whose characters alone cannot fit the context is refused before it is tokenized, so a huge prompt
    costs no tokenizer memory.
    """
    from jinja2 import TemplateError

    from tunelab.generation import render_prompt

    if isinstance(prompt, str):
        check_prompt_chars(len(prompt), served.context, "prompt")
    else:
        check_prompt_chars(sum(len(m["content"] or "") for m in prompt), served.context, "messages")
    try:
        return len(render_prompt(served.tokenizer, prompt))
    except (TunelabError, TemplateError) as exc:
        raise APIError(400, f"the chat template of {served.id!r} cannot render these messages: {exc}", param="messages") from None


async def _admit(app, served: ServedModel, body: SamplingFields, prompts: list, on_delta=None,
                 constraint: Grammar | None = None) -> tuple[Job, Any]:
    """Check the prompts against the context and queue them as one job (429 when the queue is full)."""
    lengths = [await asyncio.to_thread(_prompt_length, served, p) for p in prompts]
    settings = body.settings(max(lengths), served.context, app.state.default_max_tokens)  # the longest must fit
    rows = [p for p in prompts for _ in range(body.n)]
    job = Job(served, rows, settings, tokens=sum(lengths) * body.n + len(rows) * settings.max_new_tokens, on_delta=on_delta,
              constraint=constraint)
    try:
        future = app.state.scheduler.submit(job)
    except QueueFull as exc:
        raise APIError(429, f"the server is busy ({exc}); retry after a second", type="rate_limit_exceeded",
                       code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
    return job, future


async def _result(job: Job, future) -> list:
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        job.cancelled = True  # the client went away before its turn: the worker skips it
        raise
    except ModelGone as exc:  # unloaded between the lookup and the queue: the same answer as an unknown model
        raise APIError(404, str(exc), param="model", code="model_not_found") from None
    except ShutDown as exc:  # the drain deadline passed: the server's state, not the request, ended it
        raise APIError(503, str(exc), type="server_error", headers={"Retry-After": "5"}) from None
    except TunelabError as exc:
        raise APIError(400, str(exc)) from None


def _add_completion_routes(app) -> None:
    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        require_text(body)
        served = _lookup(app, request, body.model)
        conversation = body.conversation()
        if has_images(conversation):  # a VLM's pixel values do not go through the token engine
            from tunelab.serving.vision import answer_with_images

            return await asyncio.to_thread(answer_with_images, app.state.registry, served, body, conversation,
                                           app.state.default_max_tokens)
        plan = await asyncio.to_thread(plan_for, body, served.tokenizer)  # compiles a grammar: milliseconds
        prompt = render(served.tokenizer, conversation, plan)
        opened = opens_reasoning(served.tokenizer)
        if body.stream:
            return await _streamed(app, served, body, prompt, chat=True, plan=plan, opened=opened)
        job, future = await _admit(app, served, body, [prompt], constraint=plan.grammar)
        completions = await _result(job, future)
        answer = chat_response(served.id, completions, answer_of(plan, opened))
        app.state.metrics.observe_tokens(served.id, answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"])
        return answer

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest, request: Request):
        require_text(body)
        served = _lookup(app, request, body.model)
        prompts = body.prompts()
        app.state.limits.check_rows(len(prompts), body.n)
        if body.stream:
            if len(prompts) > 1:
                raise APIError(400, "stream with several prompts is not supported: send one prompt per request", param="prompt")
            return await _streamed(app, served, body, prompts[0], chat=False)
        job, future = await _admit(app, served, body, prompts)
        completions = await _result(job, future)
        answer = completion_response(served.id, completions, body.n)
        app.state.metrics.observe_tokens(served.id, answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"])
        return answer


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def _streamed(app, served: ServedModel, body: SamplingFields, prompt: Any, *, chat: bool, plan: Plan | None = None,
                    opened: bool = False):
    """Server-sent events: text deltas as decoded, then the finish reason (and usage if asked), then ``[DONE]``;
    a chat's reasoning goes out as ``reasoning_content`` deltas (:mod:`serving.reasoning`), tool calls are held back
    and sent as ``tool_calls`` deltas at the end (:mod:`serving.toolcalls`)."""
    if body.n > 1:
        raise APIError(400, "n > 1 with stream is not supported: stream one choice per request", param="n")
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue = asyncio.Queue()
    job, future = await _admit(app, served, body, [prompt], on_delta=lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d),
                               constraint=plan.grammar if plan else None)
    calls = ToolStream(plan) if plan is not None and plan.parse else None
    thoughts = ReasoningStream(opened) if chat else None
    future.add_done_callback(lambda f: loop.call_soon_threadsafe(deltas.put_nowait, _DONE))
    chunk_id = new_id("chatcmpl" if chat else "cmpl")

    async def events():
        try:
            if chat:
                yield _sse(chat_chunk(chunk_id, served.id, {"role": "assistant", "content": ""}))
            pieces = []
            while (item := await deltas.get()) is not _DONE:
                pieces.append(item)
                for chunk in _deltas(chat, chunk_id, served.id, item, thoughts, calls):
                    yield chunk
            if future.exception() is not None:
                yield _sse(error_body(f"generation failed: {future.exception()}", type="server_error"))
                return
            # The stream hands out text, not tokens: completion tokens are counted by re-encoding the text.
            generated = len(served.tokenizer("".join(pieces), add_special_tokens=False)["input_ids"])
            finish = "length" if generated >= job.settings.max_new_tokens else "stop"
            if thoughts:
                reasoning, rest = thoughts.finish()
                for chunk in _deltas(chat, chunk_id, served.id, rest, None, calls, reasoning):
                    yield chunk
            if calls:
                held, finish = calls.finish(chunk_id, served.id, finish)
                for chunk in held:
                    yield _sse(chunk)
            yield _sse(stream_chunk(chat, chunk_id, served.id, None, finish))
            prompt_tokens = job.tokens - job.settings.max_new_tokens
            app.state.metrics.observe_tokens(served.id, prompt_tokens, generated)
            if body.wants_usage_in_stream():
                yield _sse(usage_chunk(chat, chunk_id, served.id, prompt_tokens, generated))
            yield _sse("[DONE]")
        finally:
            job.cancelled = True  # a reader that went away frees the worker at the next token

    return StreamingResponse(events(), media_type="text/event-stream")


def _deltas(chat: bool, chunk_id: str, model_id: str, item: str, thoughts: ReasoningStream | None, calls: ToolStream | None,
            reasoning: str = ""):
    """The events of one generated delta: its reasoning part, then the text that may go out now."""
    if thoughts is not None:
        reasoning, item = thoughts.feed(item)
    if reasoning:
        yield _sse(chat_chunk(chunk_id, model_id, {"reasoning_content": reasoning}))
    if text := (calls.feed(item) if calls else item):
        yield _sse(stream_chunk(chat, chunk_id, model_id, text))


def _add_adapter_routes(app) -> None:
    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadLoraRequest):
        require_text(body)
        try:
            await asyncio.to_thread(app.state.registry.load, body.lora_name, body.lora_path)
        except TunelabError as exc:
            raise APIError(400, str(exc), param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadLoraRequest):
        require_text(body)
        if app.state.registry.get(body.lora_name) is None:
            raise APIError(404, f"adapter {body.lora_name!r} is not loaded; GET /v1/models lists what is",
                           param="lora_name", code="model_not_found")
        try:
            await asyncio.to_thread(app.state.registry.unload, body.lora_name)
        except TunelabError as exc:
            raise APIError(400, str(exc), param="lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

