"""Continuous batching (``serving.continuous``): rows of different LoRA adapters decode in one forward pass,
a request that arrives while others decode joins them at the next step and leaves when it ends, and every
greedy answer is the one ``generate`` gives for that prompt alone."""

from __future__ import annotations

import time

import pytest

from serving.conftest import PROMPTS
from tunelab.generation import SamplingSettings, generate
from tunelab.serving.continuous import ContinuousScheduler
from tunelab.serving.scheduler import Job


def job(registry, model: str, prompts, **settings) -> Job:
    settings = SamplingSettings(**{"max_new_tokens": 8, **settings})
    return Job(registry.get(model), list(prompts), settings, tokens=64 * len(prompts) + settings.max_new_tokens)


def alone(registry, model: str, prompt, **settings) -> str:
    served = registry.get(model)
    with registry.lock, served.active() as module:
        return generate(module, served.tokenizer, [prompt], SamplingSettings(**{"max_new_tokens": 8, **settings}))[0].text


def started(scheduler: ContinuousScheduler, steps: list[int]) -> ContinuousScheduler:
    scheduler.on_batch = lambda rows, seconds: steps.append(rows)
    scheduler.start()
    return scheduler


@pytest.mark.parametrize("mix, first_batch", [(True, 12), (False, 4)])
def test_three_models_answer_as_eval_does_mixed_in_one_batch_or_one_by_one(registry, eval_predictions, mix, first_batch):
    scheduler, steps = ContinuousScheduler(registry, mix_adapters=mix), []
    jobs = [job(registry, model, [prompt]) for model in ("red", "blue", "tiny") for prompt in PROMPTS]
    for j in jobs:
        scheduler.submit(j)  # all waiting before the worker starts: admitted together
    started(scheduler, steps)
    answers = [j.future.result(60)[0].text.strip() for j in jobs]
    scheduler.stop()
    assert answers == [a for model in ("red", "blue", "tiny") for a in eval_predictions[model]]
    assert steps[0] == first_batch  # mixed: both adapters and the base in one forward pass; else one model's rows
    assert scheduler.depth == 0 and scheduler.batch is None


def test_a_request_joins_the_running_batch_and_leaves_before_a_long_one(registry):
    steps: list[int] = []
    scheduler = started(ContinuousScheduler(registry), steps)
    long = job(registry, "tiny", [PROMPTS[0]], max_new_tokens=120)
    scheduler.submit(long)
    while not steps:  # the long request is decoding
        time.sleep(0.01)
    short = job(registry, "red", [PROMPTS[1]], max_new_tokens=3)
    scheduler.submit(short)
    [answer] = short.future.result(60)
    assert not long.future.done()  # it did not wait for the long one to finish
    assert 2 in steps  # both rows were in one decode step
    [long_answer] = long.future.result(120)
    scheduler.stop()
    assert long_answer.finish_reason == "length" and len(long_answer.token_ids) == 120
    assert answer.text == alone(registry, "red", PROMPTS[1], max_new_tokens=3)
    assert long_answer.text == alone(registry, "tiny", PROMPTS[0], max_new_tokens=120)


def test_a_seeded_sample_does_not_depend_on_the_rest_of_the_batch(registry):
    seeded = dict(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=10)
    scheduler = started(ContinuousScheduler(registry), [])
    by_itself = job(registry, "blue", [PROMPTS[2]] * 2, **seeded)
    scheduler.submit(by_itself)
    first = [c.text for c in by_itself.future.result(60)]
    company = [job(registry, "red", [PROMPTS[0]]), job(registry, "blue", [PROMPTS[2]] * 2, **seeded), job(registry, "tiny", [PROMPTS[3]])]
    for j in company:
        scheduler.submit(j)
    again = [c.text for c in company[1].future.result(60)]
    scheduler.stop()
    assert again == first and first[0] != first[1]  # the same draws in company; two choices, two draws


def test_a_streamed_row_sends_the_text_the_plain_answer_has(registry):
    scheduler = started(ContinuousScheduler(registry), [])
    plain = job(registry, "blue", [PROMPTS[1]], max_new_tokens=12)
    streamed = job(registry, "blue", [PROMPTS[1]], max_new_tokens=12)
    pieces: list[str] = []
    streamed.on_delta = pieces.append
    scheduler.submit(plain)
    scheduler.submit(streamed)
    assert streamed.future.result(60) == []
    scheduler.stop()
    assert "".join(pieces) == plain.future.result(1)[0].text and len(pieces) > 1


def test_one_adapter_per_batch_lets_a_waiting_request_of_another_go_next(registry):
    """Without mixing, a running batch stops taking newcomers once another adapter's request waits."""
    steps: list[int] = []
    scheduler = started(ContinuousScheduler(registry, mix_adapters=False), steps)
    ended: list[str] = []
    long = job(registry, "red", [PROMPTS[0]], max_new_tokens=40)
    scheduler.submit(long)
    while not steps:
        time.sleep(0.01)
    blue, red = job(registry, "blue", [PROMPTS[1]], max_new_tokens=3), job(registry, "red", [PROMPTS[2]], max_new_tokens=3)
    for name, j in (("blue", blue), ("red", red)):
        j.future.add_done_callback(lambda _, name=name: ended.append(name))
        scheduler.submit(j)
    red.future.result(60)
    scheduler.stop()
    assert ended == ["blue", "red"] and max(steps) == 1  # the second red request did not jump the blue one
    assert blue.future.result()[0].text == alone(registry, "blue", PROMPTS[1], max_new_tokens=3)
