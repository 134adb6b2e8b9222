"""One request cannot exhaust the server: the body bound (declared and chunked), prompts and rows per request,
prompts refused by their length before tokenizing, bounded metric labels, and a shutdown that ends on time."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import pytest

from serving.conftest import PROMPTS

SMALL = dict(max_body_bytes=64 * 1024, max_prompts=8, max_rows=16)


@pytest.fixture(scope="module")
def limited(registry):
    """A live server with small limits (64 KiB bodies, 8 prompts, 16 rows)."""
    from tunelab.serving.app import create_app
    from tunelab.serving.limits import Limits
    from tunelab.serving.server import BackgroundServer

    with BackgroundServer(create_app(registry, limits=Limits(**SMALL))) as url:
        yield url


def _completion(url: str, timeout: float = 60, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": "red", "max_tokens": 1, "temperature": 0, **body},
                      timeout=timeout)


def test_a_declared_body_over_the_bound_is_a_413_with_an_error_body(limited):
    reply = _completion(limited, prompt="x" * 100_000)
    assert reply.status_code == 413, reply.text
    error = reply.json()["error"]
    assert error["code"] == "request_too_large" and "--max-body-bytes" in error["message"]


def test_a_chunked_body_is_cut_off_while_it_streams_in(limited):
    pulled = []

    def endless():  # 64 MiB at most, without Content-Length
        for _ in range(1024):
            pulled.append(1)
            yield b" " * 65536

    reply = httpx.post(f"{limited}/v1/completions", content=endless(), timeout=60,
                       headers={"content-type": "application/json"})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"
    assert len(pulled) < 1024  # the server answered and hung up long before the body ended


def test_a_chunked_body_under_the_bound_is_served(limited):
    payload = b'{"model": "red", "prompt": "Hello", "max_tokens": 2, "temperature": 0}'
    reply = httpx.post(f"{limited}/v1/completions", content=iter([payload[:20], payload[20:]]), timeout=60,
                       headers={"content-type": "application/json"})
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["choices"]) == 1


def test_the_default_body_bound_is_4_mib(server):
    reply = _completion(server, prompt="x" * (5 * 1024 * 1024))
    assert reply.status_code == 413, reply.text[:300]


def test_prompts_and_rows_per_request_are_bounded(limited):
    too_many = _completion(limited, prompt=[f"p{i}" for i in range(9)])
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "prompt"
    assert "--max-prompts" in too_many.json()["error"]["message"]
    too_wide = _completion(limited, prompt=["a", "b", "c", "d"], n=5)  # 20 rows > 16
    assert too_wide.status_code == 400 and too_wide.json()["error"]["param"] == "n"
    fits = _completion(limited, prompt=[f"p{i}" for i in range(8)], n=2)
    assert fits.status_code == 200 and len(fits.json()["choices"]) == 16


def test_the_default_server_refuses_65_prompts(server):
    reply = _completion(server, prompt=["Hi"] * 65)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize("route, field", [("completions", "prompt"), ("chat/completions", "messages")])
def test_a_prompt_too_long_by_its_characters_is_refused_before_tokenizing(limited, registry, monkeypatch, route, field):
    import tunelab.generation as generation
    from tunelab.serving.limits import CHARS_PER_TOKEN

    seen = []
    real = generation.render_prompt
    monkeypatch.setattr(generation, "render_prompt", lambda tok, prompt: seen.append(prompt) or real(tok, prompt))
    text = "ab " * (registry.get("red").context * CHARS_PER_TOKEN // 3 + 1)  # under the 64 KiB body bound
    prompt = {"prompt": text} if field == "prompt" else {"messages": [{"role": "user", "content": text}]}
    reply = httpx.post(f"{limited}/v1/{route}", json={"model": "red", "max_tokens": 1, **prompt}, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == field
    assert seen == []  # refused on its length alone: the tokenizer never saw it


def test_random_paths_add_no_metric_series(limited):
    with httpx.Client(base_url=limited, timeout=30) as http:
        def series() -> set[str]:
            lines = http.get("/metrics").text.splitlines()
            return {line.rsplit(" ", 1)[0] for line in lines if line.startswith("tunelab_requests_total{")}

        http.get("/first-unknown-path")
        before = series()
        paths = [uuid.uuid4().hex for _ in range(25)]
        for path in paths:
            assert http.get(f"/{path}").status_code == 404
            assert http.post(f"/v1/{path}", json={}).status_code == 404
        after = series()
    assert not [s for s in after if any(p in s for p in paths)]  # no raw path became a label
    assert len(after - before) <= 1  # at most the /metrics scrape itself; every unknown path is "unmatched"
    assert any('endpoint="unmatched"' in s for s in after) and any('endpoint="/metrics"' in s for s in after)


def test_metrics_want_the_api_key_when_one_is_set(registry):
    from tunelab.serving.app import create_app
    from tunelab.serving.server import BackgroundServer

    with BackgroundServer(create_app(registry, api_key="s3cret")) as url:
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/metrics", headers={"authorization": "Bearer wrong"}).status_code == 401
        keyed = httpx.get(f"{url}/metrics", headers={"authorization": "Bearer s3cret"})
        assert keyed.status_code == 200 and "tunelab_requests_total" in keyed.text


def test_shutdown_with_a_job_in_flight_ends_within_the_drain_deadline(registry):
    from tunelab.serving.app import create_app
    from tunelab.serving.limits import GRACE_SECONDS, Limits
    from tunelab.serving.server import BackgroundServer

    drain = 1.0
    app = create_app(registry, limits=Limits(drain_seconds=drain))
    background = BackgroundServer(app, drain_seconds=drain)
    url = background.__enter__()
    body = {"model": "red", "messages": PROMPTS[0], "temperature": 0, "max_tokens": 3}
    client = threading.Thread(target=lambda: _quietly(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=120),
                              daemon=True)
    with registry.lock:  # the job in flight cannot progress: it stands for one that would decode for minutes
        client.start()
        deadline = time.monotonic() + 30
        while app.state.scheduler.depth < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.scheduler.depth >= 1
        started = time.monotonic()
        closer = threading.Thread(target=background.__exit__, args=(None, None, None), daemon=True)
        closer.start()
        closer.join(drain + min(drain, GRACE_SECONDS) + 8)
        elapsed, stuck = time.monotonic() - started, closer.is_alive()
    closer.join(120)  # a server that did not stop in time ends once the lock is free
    client.join(30)
    assert not stuck, f"the server still ran {elapsed:.1f} s after shutdown began (drain {drain} s)"


def _quietly(call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except httpx.HTTPError:
        pass  # the server went away mid-request, as it should
