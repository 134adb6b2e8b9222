"""DNS rebinding: a request for a host name the server is not reached by, or a browser POST from another site,
is refused before any route runs; the official client on 127.0.0.1 and on localhost still works."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from serving.conftest import PROMPTS

CHAT = {"model": "red", "messages": PROMPTS[0], "temperature": 0, "max_tokens": 2}


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_a_forged_host_is_a_400_and_nothing_runs(server, registry, tiny_runs, monkeypatch):
    import tunelab.generation as generation

    seen = []
    monkeypatch.setattr(generation, "render_prompt", lambda *a: seen.append(a) or pytest.fail("a prompt was rendered"))
    forged = {"host": f"attacker.example:{_port(server)}"}
    reply = httpx.post(f"{server}/v1/chat/completions", json=CHAT, headers=forged, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_host"
    assert "--allowed-host" in reply.json()["error"]["message"]
    loaded = httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": str(tiny_runs["red"])},
                        headers=forged, timeout=30)
    assert loaded.status_code == 400 and registry.get("evil") is None
    assert httpx.get(f"{server}/v1/models", headers=forged).status_code == 400  # nor can it read anything
    assert seen == []


def test_a_post_from_another_sites_page_is_a_403(server):
    reply = httpx.post(f"{server}/v1/chat/completions", json=CHAT, headers={"origin": "http://attacker.example"}, timeout=30)
    assert reply.status_code == 403 and reply.json()["error"]["code"] == "invalid_origin"
    assert httpx.post(f"{server}/v1/chat/completions", json=CHAT, headers={"origin": "null"}, timeout=30).status_code == 403
    own = httpx.post(f"{server}/v1/chat/completions", json=CHAT, headers={"origin": server}, timeout=60)
    assert own.status_code == 200, own.text


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_the_openai_client_works_by_address_and_by_localhost(server, host):
    # Always connects to 127.0.0.1; the Host header is what a client that dialled ``host`` sends.
    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120,
                    default_headers={"Host": f"{host}:{_port(server)}"})
    assert {m.id for m in client.models.list().data} >= {"red", "blue"}
    assert client.chat.completions.create(**CHAT).choices


def test_allowed_hosts_are_served(registry):
    from tunelab.serving.app import create_app
    from tunelab.serving.server import BackgroundServer

    with BackgroundServer(create_app(registry, allowed_hosts=("models.lan",))) as url:
        assert httpx.get(f"{url}/v1/models", headers={"host": f"models.lan:{_port(url)}"}).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers={"host": "other.lan"}).status_code == 400


def test_serve_passes_allowed_hosts_and_limits_to_the_app(monkeypatch, registry):
    from typer.testing import CliRunner

    from tunelab.cli import app
    from tunelab.serving import app as serving_app
    from tunelab.serving import cli, server

    made = {}
    real = serving_app.create_app
    monkeypatch.setattr(cli, "_load_registry", lambda *a: registry)
    monkeypatch.setattr(serving_app, "create_app", lambda *a, **k: made.update(k) or real(*a, **k))
    monkeypatch.setattr(server, "run_server", lambda app, host, port, **k: made.update(run=k))
    result = CliRunner().invoke(app, ["serve", "x", "--allowed-host", "a.lan", "--allowed-host", "b.lan",
                                      "--max-body-bytes", "1000", "--max-prompts", "3", "--drain-seconds", "2"])
    assert result.exit_code == 0, result.output
    assert made["allowed_hosts"] == ("a.lan", "b.lan") and made["host"] == "127.0.0.1"
    assert made["limits"].max_body_bytes == 1000 and made["limits"].max_prompts == 3
    assert made["run"] == {"drain_seconds": 2.0}
