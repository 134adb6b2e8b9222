"""The server against the official ``openai`` client: models, chat (plain and streamed), completions, parity
with ``tunelab eval`` for every adapter, and metrics."""

from __future__ import annotations

import httpx
import pytest

from serving.conftest import PROMPTS


def test_models_lists_the_base_and_each_adapter_with_parent_and_root(client, tiny_runs):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "red", "blue"}
    assert cards["tiny"].parent is None
    assert cards["red"].parent == cards["blue"].parent == "tiny"
    assert cards["red"].root == str(tiny_runs["red"]) and cards["blue"].root == str(tiny_runs["blue"])


@pytest.mark.parametrize("model", ["red", "blue", "tiny"])
def test_greedy_chat_answers_equal_the_eval_predictions(client, eval_predictions, model):
    for prompt, expected in zip(PROMPTS, eval_predictions[model]):
        reply = client.chat.completions.create(model=model, messages=prompt, temperature=0, max_tokens=8)
        choice = reply.choices[0]
        assert choice.message.role == "assistant" and choice.message.content.strip() == expected
        assert reply.model == model and choice.finish_reason in ("stop", "length")
        assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 8
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert eval_predictions["red"] != eval_predictions["blue"]  # the adapters differ, so parity means something


def test_streamed_deltas_add_up_to_the_plain_answer_and_end_with_usage(client):
    plain = client.chat.completions.create(model="blue", messages=PROMPTS[1], temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(model="blue", messages=PROMPTS[1], temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_text_completions_answer_each_prompt_n_times(client):
    reply = client.completions.create(model="red", prompt=["Hello", "The quick"], max_tokens=4, n=2, temperature=0)
    assert len(reply.choices) == 4 and [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.choices[0].text == reply.choices[1].text  # greedy: the n choices agree
    assert 4 <= reply.usage.completion_tokens <= 16 and reply.usage.prompt_tokens > 0
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="red", prompt="Hello", max_tokens=4,
                                                                            temperature=0, stream=True))
    assert streamed == reply.choices[0].text


def test_seeded_sampling_repeats_and_n_gives_n_choices(client):
    ask = dict(model="red", messages=PROMPTS[0], temperature=1.0, top_p=0.9, max_tokens=6, n=3, seed=7)
    first, second = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert len(first.choices) == 3


def test_stop_strings_end_the_answer(client):
    full = client.chat.completions.create(model="red", messages=PROMPTS[0], temperature=0, max_tokens=8).choices[0]
    word = full.message.content.split()[1] if len(full.message.content.split()) > 1 else None
    if word is None:
        pytest.skip("the tiny answer has a single word")
    cut = client.chat.completions.create(model="red", messages=PROMPTS[0], temperature=0, max_tokens=8, stop=[word])
    assert word not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"


def test_health_and_metrics(client, server):
    client.chat.completions.create(model="red", messages=PROMPTS[0], temperature=0, max_tokens=2)
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    text = httpx.get(f"{server}/metrics").text
    for name in ("tunelab_requests_total", "tunelab_completion_tokens_total", "tunelab_request_latency_seconds_bucket",
                 "tunelab_queue_depth", "tunelab_loaded_adapters 2.0", "tunelab_batch_rows_count"):
        assert name in text
    assert 'model="red",status="200"' in text
    assert 'endpoint="/v1/chat/completions"' in text  # labelled by route template


@pytest.mark.parametrize("model", ["red", "blue"])
def test_served_answers_equal_the_predictions_in_the_runs_own_eval_json(client, tiny_runs, model):
    import json

    report = json.loads((tiny_runs[model] / "eval.json").read_text())
    max_new = report["settings"]["task"]["max_new_tokens"]
    for row in report["tuned"]["examples"]:
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": row["prompt"]}],
                                               temperature=0, max_tokens=max_new)
        assert reply.choices[0].message.content.strip() == row["prediction"]
