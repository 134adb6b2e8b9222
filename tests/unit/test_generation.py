"""The decoding component: batching, seeding, stops, finish reasons, streaming and end-of-turn tokens."""

from __future__ import annotations

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.evaluation.generate import generate_answers
from tunelab.generation import SamplingSettings, end_of_turn_ids, generate, stream
from tunelab.models.tiny import build_tiny_model, build_tiny_tokenizer

PROMPTS = [
    [{"role": "user", "content": "Colour 3?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What colour is the sky at noon in summer?"}],
    [{"role": "user", "content": "Hi"}],
]

GEMMA_LIKE_TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model("llama", vocab_size=len(tokenizer)).eval()


def _alternating(tokenizer, end_id: int, other_id: int):
    """A model without decoder blocks that answers ``end_id`` after any token but ``end_id``, and ``other_id``
    after it: so a decoder that does not stop at ``end_id`` goes on with visible text."""
    model = build_tiny_model("llama", vocab_size=len(tokenizer), layers=0)
    hidden = model.config.hidden_size
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.model.embed_tokens.weight[end_id] = torch.nn.functional.one_hot(torch.tensor(1), hidden).float()
        model.lm_head.weight.zero_()
        model.lm_head.weight[end_id, 0] = 10.0
        model.lm_head.weight[other_id, 1] = 10.0
    return model.eval()


def test_greedy_batched_equals_one_at_a_time(model, tokenizer):
    settings = SamplingSettings(max_new_tokens=8)
    together = generate(model, tokenizer, PROMPTS, settings, batch_size=3, stop_token_ids=[])
    alone = [generate(model, tokenizer, [p], settings, batch_size=1, stop_token_ids=[])[0] for p in PROMPTS]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.text for c in together] == [c.text for c in alone]
    rendered = [len(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
                for p in PROMPTS]
    assert [c.prompt_tokens for c in together] == rendered


def test_rendered_string_prompt_equals_conversation(model, tokenizer):
    text = tokenizer.apply_chat_template(PROMPTS[0], tokenize=False, add_generation_prompt=True)
    settings = SamplingSettings(max_new_tokens=6)
    assert generate(model, tokenizer, [text], settings) == generate(model, tokenizer, [PROMPTS[0]], settings)


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(model, tokenizer):
    def sample(seed):
        settings = SamplingSettings(temperature=1.0, top_p=0.95, max_new_tokens=12, seed=seed)
        return [c.token_ids for c in generate(model, tokenizer, PROMPTS, settings, batch_size=2, stop_token_ids=[])]

    state = torch.random.get_rng_state()
    first = sample(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert sample(1) == first
    assert sample(2) != first


def test_stop_string_cuts_text_and_ids(model, tokenizer):
    free = generate(model, tokenizer, PROMPTS[:1], SamplingSettings(max_new_tokens=16), stop_token_ids=[])[0]
    assert len(free.text) >= 6, free.text
    stop = free.text[3:5]
    expected = free.text[: free.text.find(stop)]
    [cut] = generate(model, tokenizer, PROMPTS[:1], SamplingSettings(max_new_tokens=16, stop=(stop,)), stop_token_ids=[])
    assert cut.text == expected and cut.finish_reason == "stop"
    assert expected.startswith(tokenizer.decode(cut.token_ids)) and len(cut.token_ids) < len(free.token_ids)


def test_length_finish_reason(model, tokenizer):
    completions = generate(model, tokenizer, PROMPTS, SamplingSettings(max_new_tokens=4), stop_token_ids=[])
    assert all(c.finish_reason == "length" and len(c.token_ids) == 4 for c in completions)


def test_streamed_text_equals_generated_text(model, tokenizer):
    for settings in (SamplingSettings(max_new_tokens=12), SamplingSettings(max_new_tokens=12, stop=("e",))):
        expected = generate(model, tokenizer, PROMPTS[1:2], settings, stop_token_ids=[])[0].text
        pieces = list(stream(model, tokenizer, PROMPTS[1], settings, stop_token_ids=[]))
        assert "".join(pieces) == expected
        assert len(pieces) > 1 or len(expected) <= 1  # it streams, not one piece at the end


def test_stream_closed_early_stops_generation(model, tokenizer):
    deltas = stream(model, tokenizer, PROMPTS[0], SamplingSettings(max_new_tokens=200), stop_token_ids=[])
    assert next(deltas)
    deltas.close()  # joins the generating thread: must not wait for all 200 tokens or hang


def test_end_of_turn_ids_chatml(tokenizer):
    assert end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]  # eos is <|im_end|> too


def test_end_of_turn_ids_when_eos_differs():
    tok = build_tiny_tokenizer()
    tok.eos_token = "<|endoftext|>"  # a base model given the ChatML fallback: eos is not the end of a turn
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert end_of_turn_ids(tok) == [im_end, eos]


def test_end_of_turn_ids_gemma_like_template():
    tok = build_tiny_tokenizer(chat_template=GEMMA_LIKE_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.eos_token = "<|endoftext|>"
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<end_of_turn>"), tok.eos_token_id]


def test_end_of_turn_ids_without_template():
    tok = build_tiny_tokenizer(chat_template=None)
    assert end_of_turn_ids(tok) == [tok.eos_token_id]


def test_default_stops_at_end_of_turn_not_only_eos():
    tok = build_tiny_tokenizer()
    tok.eos_token = "<|endoftext|>"
    im_end, x = tok.convert_tokens_to_ids("<|im_end|>"), tok("x", add_special_tokens=False)["input_ids"][0]
    model = _alternating(tok, im_end, x)
    [default] = generate(model, tok, PROMPTS[:1], SamplingSettings(max_new_tokens=10))
    assert default.token_ids == [im_end] and default.finish_reason == "stop" and default.text == ""
    [eos_only] = generate(model, tok, PROMPTS[:1], SamplingSettings(max_new_tokens=10), stop_token_ids=[tok.eos_token_id])
    assert eos_only.finish_reason == "length" and eos_only.text == "xxxxx"
    assert generate_answers(model, tok, PROMPTS[:1], max_new_tokens=10) == [""]


def test_bad_settings_and_prompts_are_user_errors(model, tokenizer):
    with pytest.raises(TunelabError, match="temperature"):
        SamplingSettings(temperature=-1)
    with pytest.raises(TunelabError, match="top_p"):
        SamplingSettings(top_p=0)
    with pytest.raises(TunelabError, match="assistant"):
        generate(model, tokenizer, [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]])
    assert SamplingSettings(stop="\n").stop == ("\n",)


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_prompt_learning_models_decode_one_prompt_at_a_time(model, tokenizer, name, monkeypatch):
    """peft ignores position ids for prompt learning, so left padding would shift a padded row's positions:
    such models are decoded one prompt at a time (each row also stops on its own)."""
    from peft import get_peft_model

    from tunelab.methods import get_method

    method = get_method(name)
    options = method.options_class(num_virtual_tokens=3, init="random")
    tuned = get_peft_model(build_tiny_model(seed=1), method.peft_config(model, options))
    shapes = []
    real = type(tuned).generate

    def recording(self, *args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(tuned), "generate", recording)
    prompts = [[{"role": "user", "content": text}] for text in ("hi", "a much longer question here")]
    generate(tuned, tokenizer, prompts, SamplingSettings(max_new_tokens=3), batch_size=8)
    assert [shape[0] for shape in shapes] == [1, 1]
