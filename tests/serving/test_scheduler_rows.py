"""Both schedulers (continuous and dynamic) with jobs of many rows: every choice of every prompt comes back, in
OpenAI's order, even when rows end at different steps; a job larger than one batch is split; ``stop`` honours
its drain deadline; unloading an adapter never touches another adapter's requests."""

from __future__ import annotations

import threading
import time

import pytest

from serving.conftest import PROMPTS
from tunelab.generation import SamplingSettings, generate
from tunelab.serving.continuous import ContinuousScheduler
from tunelab.serving.scheduler import Job, ModelGone, Scheduler

SCHEDULERS = {"continuous": ContinuousScheduler, "dynamic": Scheduler}
# Rendered prompts of different lengths: a completion's prompt_tokens says which prompt it answers.
TEXTS = ["Hi", "The quick brown fox jumps over", "SELECT name"]


def _rows_job(registry, texts: list[str], n: int, **settings) -> Job:
    """One request's job as the HTTP layer builds it: prompt-major rows, ``n`` copies of each prompt."""
    served = registry.get("tiny")
    settings = SamplingSettings(**{"max_new_tokens": 24, **settings})
    lengths = [len(served.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    rows = [t for t in texts for _ in range(n)]
    return Job(served, rows, settings, tokens=sum(lengths) * n + len(rows) * settings.max_new_tokens)


def _wait_until_decoding(scheduler, job: Job) -> None:
    """Return once the worker has taken (some rows of) ``job`` off the queue."""
    deadline = time.monotonic() + 30
    while job in scheduler.pending and not getattr(job, "taken", 0) and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(0.05)  # into its first forward passes


def _prompt_tokens(registry, texts: list[str], n: int) -> list[int]:
    tokenizer = registry.get("tiny").tokenizer
    return [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts for _ in range(n)]


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_sampled_rows_that_end_at_different_steps_all_come_back_in_prompt_major_order(registry, kind):
    batches: list[int] = []
    scheduler = SCHEDULERS[kind](registry, on_batch=lambda rows, seconds: batches.append(rows))
    # Single characters as stop strings end sampled rows of the random model after a few tokens, each at its own step.
    sampled = dict(temperature=1.5, seed=11, stop=("a", "e", "o"))
    asked = [(TEXTS[:2], 4), (TEXTS[1:], 3)]  # (prompts, n) of two requests
    jobs = [_rows_job(registry, texts, n, **sampled) for texts, n in asked]
    for j in jobs:
        scheduler.submit(j)
    scheduler.start()
    results = [j.future.result(60) for j in jobs]
    scheduler.stop()
    for (texts, n), result in zip(asked, results):
        assert len(result) == len(texts) * n  # every choice of every prompt, each attributed to its own prompt
        assert [c.prompt_tokens for c in result] == _prompt_tokens(registry, texts, n)
    lengths = {len(c.token_ids) for result in results for c in result}
    assert len(lengths) > 2  # the rows did end at different steps
    assert any(c.finish_reason == "stop" for result in results for c in result)


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_a_job_larger_than_a_batch_is_split_and_still_answers_complete_and_in_order(registry, kind):
    batches: list[int] = []
    scheduler = SCHEDULERS[kind](registry, max_batch_rows=3, on_batch=lambda rows, seconds: batches.append(rows))
    big = _rows_job(registry, TEXTS, 4, max_new_tokens=6)  # 12 rows
    small = _rows_job(registry, TEXTS[:1], 2, max_new_tokens=6)
    scheduler.submit(big)
    scheduler.submit(small)
    scheduler.start()
    answers, small_answers = big.future.result(60), small.future.result(60)
    scheduler.stop()
    assert 0 < max(batches) <= 3  # never the 12 rows at once
    assert [c.prompt_tokens for c in answers] == _prompt_tokens(registry, TEXTS, 4)
    assert [c.prompt_tokens for c in small_answers] == _prompt_tokens(registry, TEXTS[:1], 2)
    served = registry.get("tiny")
    with registry.lock, served.active() as module:  # greedy: each row's answer is the one it gets alone
        expected = generate(module, served.tokenizer, TEXTS, SamplingSettings(max_new_tokens=6))
    assert [c.text for c in answers] == [e.text for e in expected for _ in range(4)]


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_the_token_bound_splits_a_job_too(registry, kind):
    batches: list[int] = []
    big = _rows_job(registry, TEXTS, 2, max_new_tokens=4)  # 6 rows
    per_row = -(-big.tokens // len(big.prompts))
    scheduler = SCHEDULERS[kind](registry, max_batch_tokens=2 * per_row, on_batch=lambda rows, seconds: batches.append(rows))
    scheduler.submit(big)
    scheduler.start()
    answers = big.future.result(60)
    scheduler.stop()
    assert 0 < max(batches) <= 2 and len(answers) == 6
    assert [c.prompt_tokens for c in answers] == _prompt_tokens(registry, TEXTS, 2)


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_stop_cancels_what_is_left_at_its_deadline_and_returns(registry, kind):
    batches: list[int] = []
    scheduler = SCHEDULERS[kind](registry, max_batch_rows=4, on_batch=lambda rows, seconds: batches.append(rows))
    long = _rows_job(registry, TEXTS * 16, 4, max_new_tokens=400)  # 192 rows of 400 tokens: a minute or more
    waiting = _rows_job(registry, TEXTS[:1], 1, max_new_tokens=4)
    scheduler.submit(long)
    scheduler.submit(waiting)
    scheduler.start()
    _wait_until_decoding(scheduler, long)
    assert not long.future.done()
    started = time.monotonic()
    scheduler.stop(0.5)
    assert time.monotonic() - started < 3
    for j in (long, waiting):
        assert j.future.done() and (j.future.cancelled() or j.future.exception() is not None)
    assert scheduler.depth == 0


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_unloading_an_adapter_mid_flight_leaves_the_other_adapters_requests_alone(tiny_llama, tiny_runs, kind):
    from tunelab.serving.models import Registry

    registry = Registry(str(tiny_llama), base_id="tiny")
    registry.load("red", tiny_runs["red"])
    registry.load("blue", tiny_runs["blue"])
    settings = SamplingSettings(max_new_tokens=60)

    def alone(model: str, prompt) -> str:
        served = registry.get(model)
        with registry.lock, served.active() as module:
            return generate(module, served.tokenizer, [prompt], settings)[0].text

    expected = {(m, i): alone(m, p) for m in ("red", "blue") for i, p in enumerate(PROMPTS)}
    batches: list[int] = []
    scheduler = SCHEDULERS[kind](registry, on_batch=lambda rows, seconds: batches.append(rows))
    jobs = {(m, i): Job(registry.get(m), [p], settings, tokens=80) for i, p in enumerate(PROMPTS) for m in ("red", "blue")}
    for j in jobs.values():
        scheduler.submit(j)
    scheduler.start()
    _wait_until_decoding(scheduler, jobs[("red", 0)])
    assert not all(j.future.done() for (m, _), j in jobs.items() if m == "blue")
    unloading = threading.Thread(target=registry.unload, args=("blue",))
    unloading.start()
    answers = {key: j.future.result(60)[0].text for key, j in jobs.items()}  # none raises
    unloading.join(60)
    scheduler.stop()
    assert not unloading.is_alive() and registry.get("blue") is None and "blue" not in registry.get("red").backbone.adapters
    assert answers == expected  # red's and blue's admitted requests answered as each gives alone
    after = SCHEDULERS[kind](registry)
    after.start()
    with pytest.raises(ModelGone, match="blue"):  # a request for the unloaded adapter gets a clear error
        after.submit(Job(jobs[("blue", 0)].model, [PROMPTS[0]], settings, tokens=80)).result(10)
    after.stop()


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_a_model_unloaded_between_lookup_and_queue_is_a_404_like_an_unknown_one(registry, kind, monkeypatch):
    """The race the soak test met: the request found its adapter, which was unloaded before the job was queued."""
    import httpx

    from tunelab.serving.app import create_app
    from tunelab.serving.server import BackgroundServer

    monkeypatch.setattr(registry, "retain", lambda served: False)  # what retain answers once the name is gone
    with BackgroundServer(create_app(registry, batching=kind)) as url:
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                           json={"model": "blue", "messages": PROMPTS[0], "max_tokens": 2})
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found", reply.text
    assert "unloaded" in reply.json()["error"]["message"]
