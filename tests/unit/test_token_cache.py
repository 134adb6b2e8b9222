"""The tokenized-data cache returns exactly what tokenizing returns, and misses whenever the result could differ."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from tunelab.data import load_examples, prepare_tokenizer, tokenize_examples
from tunelab.data.token_cache import cache_dir, cached_tokenize
from tunelab.models.load import load_tokenizer


@pytest.fixture
def setup(tiny_llama, chat_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_TOKENIZED_CACHE", str(tmp_path / "tokenized"))
    tokenizer = load_tokenizer(str(tiny_llama))
    prepare_tokenizer(tokenizer, "auto")
    return load_examples([str(chat_data["train"])]), tokenizer


def test_a_hit_returns_what_tokenizing_returns(setup):
    examples, tokenizer = setup
    options = {"loss_on": "assistant", "max_length": 28, "too_long": "truncate"}
    direct, direct_stats = tokenize_examples(examples, tokenizer, **options)
    first, first_stats, hit_first = cached_tokenize(examples, tokenizer, **options)
    again, again_stats, hit_again = cached_tokenize(examples, tokenizer, **options)
    assert (hit_first, hit_again) == (False, True)
    assert again == first == direct and asdict(again_stats) == asdict(direct_stats)
    assert direct_stats.truncated + len(direct_stats.dropped) > 0  # the statistics that survive the round trip are not all zeros


def test_anything_that_changes_the_result_misses(setup):
    examples, tokenizer = setup
    options = {"loss_on": "assistant", "max_length": 64, "too_long": "truncate"}
    cached_tokenize(examples, tokenizer, **options)
    assert not cached_tokenize(examples, tokenizer, **{**options, "loss_on": "all"})[2]
    assert not cached_tokenize(examples, tokenizer, **{**options, "max_length": 63})[2]
    assert not cached_tokenize(examples[:-1], tokenizer, **options)[2]
    edited = list(examples)
    edited[0] = type(edited[0])(({**edited[0].messages[0], "content": "changed"},) + edited[0].messages[1:], edited[0].source)
    assert not cached_tokenize(edited, tokenizer, **options)[2]
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert not cached_tokenize(examples, tokenizer, **options)[2]


def test_a_damaged_entry_is_replaced_and_the_cache_can_be_switched_off(setup, monkeypatch):
    examples, tokenizer = setup
    options = {"loss_on": "assistant", "max_length": 64, "too_long": "truncate"}
    expected, _, _ = cached_tokenize(examples, tokenizer, **options)
    (entry,) = cache_dir().glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])
    again, _, hit = cached_tokenize(examples, tokenizer, **options)
    assert not hit and again == expected and cached_tokenize(examples, tokenizer, **options)[2]
    monkeypatch.setenv("TUNELAB_TOKENIZED_CACHE", "0")
    assert not cached_tokenize(examples, tokenizer, **options)[2]
