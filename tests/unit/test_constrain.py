"""Constrained decoding (:mod:`tunelab.generation.constrain`): every row follows its own grammar in ``generate``
and ``stream``, greedy or sampled, beside free rows; the model's own vocabulary beyond the tokenizer is masked."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from tunelab.generation import SamplingSettings, generate, stream
from tunelab.generation.constrain import RowMatcher, grammar_problem, json_schema_grammar
from tunelab.models.tiny import build_tiny_model, build_tiny_tokenizer

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["kind", "n"],
          "properties": {"kind": {"enum": ["a", "bb"]}, "n": {"type": "integer", "minimum": 0, "maximum": 50},
                         "flag": {"type": "boolean"}}}


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model("llama", vocab_size=len(tokenizer) + 13), tokenizer  # logits wider than the vocabulary


PROMPTS = [[{"role": "user", "content": f"Colour {i}?"}] for i in range(3)]


@pytest.mark.parametrize("settings", [SamplingSettings(max_new_tokens=80),
                                      SamplingSettings(temperature=1.3, top_p=0.9, seed=3, max_new_tokens=80)])
def test_each_constrained_row_follows_its_schema(tiny, settings):
    model, tokenizer = tiny
    grammar = json_schema_grammar(SCHEMA)
    done = generate(model, tokenizer, PROMPTS, settings, constraints=[grammar, None, grammar])
    for row in (done[0], done[2]):
        assert row.finish_reason == "stop"
        jsonschema.validate(json.loads(row.text), SCHEMA)
    with pytest.raises(json.JSONDecodeError):
        json.loads(done[1].text)  # the free row of a random model is not JSON


def test_a_stream_follows_its_schema_and_equals_generate(tiny):
    model, tokenizer = tiny
    grammar = json_schema_grammar(SCHEMA)
    settings = SamplingSettings(max_new_tokens=80)
    text = "".join(stream(model, tokenizer, PROMPTS[1], settings, constraint=grammar))
    assert text == generate(model, tokenizer, [PROMPTS[1]], settings, constraints=[grammar])[0].text
    jsonschema.validate(json.loads(text), SCHEMA)


def test_the_mask_leaves_only_allowed_tokens(tiny):
    _, tokenizer = tiny
    matcher = RowMatcher(json_schema_grammar({"enum": ["a"]}), tokenizer, [tokenizer.eos_token_id])
    logits = torch.zeros(len(tokenizer) + 13)
    matcher.mask_(logits)
    allowed = torch.isfinite(logits).nonzero().flatten().tolist()
    assert allowed and all(tokenizer.decode([t]) in '"a"' for t in allowed)  # prefixes of the one answer
    assert grammar_problem(json_schema_grammar({"not": {"type": "string"}}), tokenizer, [tokenizer.eos_token_id])
