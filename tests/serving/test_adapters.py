"""Many adapters on one base: hot-loading and unloading while serving, per-adapter batches, and a bounded load test."""

from __future__ import annotations

import statistics
import threading
import time

import httpx
import openai
import pytest

from serving.conftest import PROMPTS


def _answer(client, model, prompt, max_tokens=8):
    reply = client.chat.completions.create(model=model, messages=prompt, temperature=0, max_tokens=max_tokens)
    return reply.choices[0].message.content.strip()


def test_an_adapter_loads_and_unloads_while_serving(client, server, tiny_runs, eval_predictions, registry):
    loaded = httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": "blue2", "lora_path": str(tiny_runs["blue"] / "adapter")})
    assert loaded.status_code == 200, loaded.text
    assert registry.get("blue2").backbone is registry.get("red").backbone  # shares the base in memory
    assert "blue2" in {m.id for m in client.models.list().data}
    assert [_answer(client, "blue2", p) for p in PROMPTS] == eval_predictions["blue"]

    assert httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": "blue2"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        _answer(client, "blue2", PROMPTS[0])
    assert [_answer(client, m, PROMPTS[0]) for m in ("red", "blue")] == [eval_predictions["red"][0], eval_predictions["blue"][0]]


@pytest.mark.parametrize("body, status", [
    ({"lora_name": "broken", "lora_path": "/no/such/run"}, 400),
    ({"lora_name": "red", "lora_path": "RUN"}, 400),  # the name is taken
    ({"lora_name": "has space", "lora_path": "RUN"}, 400),
    ({"lora_name": "x"}, 422),
])
def test_an_adapter_that_cannot_load_is_a_400_and_the_server_keeps_serving(client, server, tiny_runs, body, status):
    body = {k: str(tiny_runs["blue"]) if v == "RUN" else v for k, v in body.items()}
    reply = httpx.post(f"{server}/v1/load_lora_adapter", json=body)
    assert reply.status_code == status and reply.json()["error"]["message"]
    assert _answer(client, "red", PROMPTS[0], 2) is not None
    assert {m.id for m in client.models.list().data} == {"tiny", "red", "blue"}


def test_unloading_what_is_not_loaded_is_a_404_and_the_base_cannot_be_unloaded(server):
    assert httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": "ghost"}).status_code == 404
    assert httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": "tiny"}).status_code == 400


def test_unloading_the_last_adapter_gives_back_the_plain_base(tiny_llama, tiny_runs, eval_predictions):
    from tunelab.generation import SamplingSettings, generate
    from tunelab.serving.models import Registry

    registry = Registry(str(tiny_llama), base_id="tiny")
    registry.load("red", tiny_runs["red"])
    registry.unload("red")
    base = registry.get("tiny")
    assert base.backbone.peft is None and not any("lora" in n for n, _ in base.backbone.base.named_modules())
    with base.active() as module:
        texts = [c.text.strip() for c in generate(module, base.tokenizer, PROMPTS, SamplingSettings(max_new_tokens=8))]
    assert texts == eval_predictions["tiny"]


def test_waiting_requests_are_batched_per_adapter_and_settings(registry):
    from tunelab.generation import SamplingSettings
    from tunelab.serving.scheduler import Job, Scheduler

    batches = []
    scheduler = Scheduler(registry, on_batch=lambda rows, seconds: batches.append(rows))
    greedy = SamplingSettings(max_new_tokens=4)
    jobs = [Job(registry.get(m), [PROMPTS[i % 4]], greedy, tokens=30) for i, m in enumerate(["red", "blue", "red", "red", "blue"])]
    jobs.append(Job(registry.get("red"), [PROMPTS[0]], SamplingSettings(temperature=1, max_new_tokens=4, seed=1), tokens=30))
    futures = [scheduler.submit(j) for j in jobs]
    scheduler.start()
    results = [f.result(60) for f in futures]
    scheduler.stop()
    assert batches == [3, 2, 1]  # red x3 together, then blue x2, then the seeded sample alone
    assert all(len(r) == 1 for r in results)


def test_load_16_clients_x_2_requests_over_mixed_adapters(server, eval_predictions):
    from openai import OpenAI

    models = ["red", "blue", "tiny"]
    latencies, failures, wrong = [], [], []

    def client_work(index: int) -> None:
        client = OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=120)
        for k in range(2):
            model, p = models[(index + k) % 3], (index + k) % len(PROMPTS)
            started = time.monotonic()
            try:
                text = _answer(client, model, PROMPTS[p])
            except openai.APIStatusError as exc:
                failures.append(exc.status_code)
                continue
            latencies.append(time.monotonic() - started)
            if text != eval_predictions[model][p]:
                wrong.append((model, p, text))

    threads = [threading.Thread(target=client_work, args=(i,)) for i in range(16)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    wall = time.monotonic() - started
    assert not any(t.is_alive() for t in threads)
    assert not [s for s in failures if s >= 500] and not failures and not wrong
    cuts = statistics.quantiles(latencies, n=20)
    print(f"\nload test: 32 requests in {wall:.1f} s, p50 {statistics.median(latencies):.2f} s, p95 {cuts[18]:.2f} s")
    metrics = httpx.get(f"{server}/metrics").text
    assert "tunelab_batch_rows_bucket" in metrics


@pytest.mark.parametrize("method", [("method.name=full",), ("method.name=prompt", "method.num_virtual_tokens=4")])
def test_a_run_peft_cannot_share_is_served_as_its_own_model(client, server, registry, tiny_llama, tmp_path, method):
    import json

    from serving.conftest import train_tiny_run

    run = train_tiny_run(tmp_path, tiny_llama, "own", ["red", "pink"], method=method)
    name = method[0].split("=")[1]
    assert httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(run)}).status_code == 200
    try:
        served = registry.get(name)
        assert served.backbone is None and served.parent == (None if name == "full" else "tiny")
        report = json.loads((run / "eval.json").read_text())
        for row in report["tuned"]["examples"]:
            assert _answer(client, name, [{"role": "user", "content": row["prompt"]}]) == row["prediction"]
    finally:
        httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": name})


def test_a_cancelled_stream_stops_decoding_at_the_next_token(registry):
    from tunelab.generation import SamplingSettings
    from tunelab.serving.scheduler import Job, Scheduler

    deltas = []
    scheduler = Scheduler(registry)
    job = Job(registry.get("tiny"), [PROMPTS[2]], SamplingSettings(max_new_tokens=400), tokens=420)

    def on_delta(text: str) -> None:
        deltas.append(text)
        job.cancelled = True  # what the SSE generator does when its reader goes away

    job.on_delta = on_delta
    scheduler.submit(job)
    scheduler.start()
    assert job.future.result(60) == [] and len(deltas) == 1
    scheduler.stop()
    assert scheduler.depth == 0
