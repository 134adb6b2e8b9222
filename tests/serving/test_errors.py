"""Refusals: every malformed request gets a 4xx with OpenAI's error body; the API key; the bounded queue's 429."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from serving.conftest import PROMPTS

USER = [{"role": "user", "content": "Colour 1?"}]


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "messages": USER}, 404, "model"),
    ({"model": "red", "messages": []}, 400, "messages"),
    ({"model": "red", "messages": USER + [{"role": "assistant", "content": "It is"}]}, 400, "messages"),
    ({"model": "red", "messages": USER + [{"role": "system", "content": "late"}, *USER]}, 400, "messages"),
    ({"model": "red", "messages": [{"role": "wizard", "content": "hi"}]}, 422, "messages.0.role"),
    ({"model": "red", "messages": USER, "max_tokens": 100_000}, 400, "max_tokens"),
    ({"model": "red", "messages": USER, "temperature": "hot"}, 422, "temperature"),
    ({"model": "red", "messages": USER, "n": 0}, 422, "n"),
    ({"model": "red", "messages": "hello"}, 422, "messages"),
    ({"messages": USER}, 422, "model"),
    ({"model": "red", "messages": USER, "stream": True, "n": 2}, 400, "n"),
    ({"model": "red", "messages": USER, "n": 17}, 422, "n"),
    ({"model": "red", "messages": USER, "seed": 2**63}, 422, "seed"),
    ({"model": "red", "messages": USER, "seed": 2**64}, 422, "seed"),
    ({"model": "red", "messages": USER, "seed": -(2**63) - 1}, 422, "seed"),
    ({"model": "red", "messages": USER, "max_tokens": 2**64}, 400, "max_tokens"),
    ({"model": "red", "messages": USER, "max_completion_tokens": 2**70}, 400, "max_tokens"),
    ({"model": "red", "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ({"model": "red", "messages": USER, "stop": [f"s{i}" for i in range(10_000)]}, 422, "stop"),
    ({"model": "red", "messages": USER, "stop": "x" * 513}, 422, "stop"),
])
def test_malformed_chat_requests_get_a_4xx_with_an_error_body(server, body, status, param):
    reply = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param


@pytest.mark.parametrize("route, body, param", [
    ("chat/completions", {"model": "red", "messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"),
    ("chat/completions", {"model": "red", "messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
     "messages.0.content.0.text"),
    ("chat/completions", {"model": "red\ud800", "messages": USER}, "model"),
    ("chat/completions", {"model": "red", "messages": USER, "stop": ["\ud800"]}, "stop.0"),
    ("completions", {"model": "red", "prompt": ["fine", "\ud83d"]}, "prompt.1"),
    ("load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp/\ud800"}, "lora_path"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(server, route, body, param):
    # json.dumps writes the lone surrogate as the escape "\ud800", exactly what a client's JSON may hold
    reply = httpx.post(f"{server}/v1/{route}", content=json.dumps(body).encode(),
                       headers={"content-type": "application/json"}, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and "surrogate" in error["message"]


def test_the_bounds_themselves_are_still_served(client):
    reply = client.chat.completions.create(model="red", messages=USER, temperature=0, max_tokens=2, stop=["x" * 512, "a", "b", "c"])
    assert reply.choices
    for seed in (2**63 - 1, -(2**63)):
        assert client.chat.completions.create(model="red", messages=USER, temperature=1, max_tokens=2, seed=seed).choices


@pytest.mark.parametrize("content, headers", [(b'{"model": "red", "messages": [', {"content-type": "application/json"}),
                                              (b"not json at all", {"content-type": "application/json"}),
                                              (b"[1, 2]", {"content-type": "application/json"})])
def test_a_body_that_is_not_a_json_object_is_a_400(server, content, headers):
    reply = httpx.post(f"{server}/v1/chat/completions", content=content, headers=headers, timeout=30)
    assert reply.status_code == 400 and "JSON" in reply.json()["error"]["message"]


def test_the_openai_client_raises_its_usual_exceptions(client):
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="red", messages=USER, max_tokens=10_000)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="red", prompt=[], max_tokens=2)


def test_an_unknown_route_is_a_404_with_an_error_body(server):
    reply = httpx.get(f"{server}/v1/nothing-here")
    assert reply.status_code == 404 and "error" in reply.json()


def test_with_an_api_key_requests_without_it_get_401(registry):
    from openai import OpenAI

    from tunelab.serving.app import create_app
    from tunelab.serving.server import BackgroundServer

    with BackgroundServer(create_app(registry, api_key="s3cret")) as url:
        for key in ("wrong", ""):
            with pytest.raises(openai.AuthenticationError):
                OpenAI(base_url=f"{url}/v1", api_key=key or "x", max_retries=0).models.list()
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # health checks need no key
        good = OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="red", messages=USER, temperature=0, max_tokens=2).choices


def test_a_full_queue_answers_429_with_retry_after_and_the_admitted_request_still_completes(registry):
    from tunelab.serving.app import create_app
    from tunelab.serving.server import BackgroundServer

    app = create_app(registry, max_pending=1)
    body = {"model": "red", "messages": PROMPTS[0], "temperature": 0, "max_tokens": 3}
    with BackgroundServer(app) as url:
        results = []
        with registry.lock:  # the worker takes the first request, then waits for the lock: the queue is full
            first = threading.Thread(target=lambda: results.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)))
            first.start()
            deadline = time.monotonic() + 30
            while app.state.scheduler.depth < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            refused = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        first.join(60)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert results and results[0].status_code == 200


def test_a_reader_that_leaves_mid_stream_frees_the_worker(server, registry, client):
    body = {"model": "tiny", "messages": PROMPTS[2], "temperature": 0, "max_tokens": 400, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=30) as reply:
        next(reply.iter_lines())  # the first event arrived, then the client goes away
    started = time.monotonic()
    answer = client.chat.completions.create(model="red", messages=PROMPTS[0], temperature=0, max_tokens=2)
    assert answer.choices and time.monotonic() - started < 30
