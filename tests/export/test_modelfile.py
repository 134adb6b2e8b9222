"""The Ollama Modelfile: pieces read off the training chat template reproduce it; the thresholds judge figures."""

from __future__ import annotations

from tunelab.export.checks import judge
from tunelab.export.modelfile import derive_pieces, go_template, modelfile_text, render_pieces, template_parity
from tunelab.models.tiny import build_tiny_tokenizer

SMOLLM_LIKE = (  # SmolLM2's template: a default system prompt when the conversation has none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_pieces_reproduce_chatml_and_a_default_system_prompt():
    for template in (None, SMOLLM_LIKE):
        tokenizer = build_tiny_tokenizer() if template is None else build_tiny_tokenizer(chat_template=template)
        pieces = derive_pieces(tokenizer)
        assert template_parity(tokenizer, pieces)
        conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert render_pieces(pieces, conversation, True) == expected
    assert pieces.head_without_system == "<|im_start|>system\nYou are helpful.<|im_end|>\n" and pieces.head_with_system == ""


def test_modelfile_has_template_and_stops():
    tokenizer = build_tiny_tokenizer(chat_template=SMOLLM_LIKE)
    text, parity = modelfile_text("m.gguf", tokenizer, ["<|im_end|>"], adds_bos=False)
    assert parity and text.splitlines()[1] == "FROM ./m.gguf" and 'PARAMETER stop "<|im_end|>"' in text
    template = go_template(derive_pieces(tokenizer))
    assert template.count("{{ if ") + template.count("{{ range ") == template.count("{{ end }}")  # balanced blocks
    assert "<|im_start|>user\n{{ $m.Content }}<|im_end|>\n" in template and "You are helpful." in template


def test_a_template_that_is_not_fixed_text_gets_no_template_line():
    odd = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"  # content changed: not expressible
    text, parity = modelfile_text("m.gguf", build_tiny_tokenizer(chat_template=odd), ["<|im_end|>"], adds_bos=False)
    assert not parity and 'TEMPLATE """' not in text


def _figures(**changes):
    base = {"n_prompts": 4, "prompt_tokens_equal": 4, "template": {"passed": True}, "greedy_agreement": 1.0,
            "perplexity_increase": 0.001, "stops": {"eos_gguf": 2, "eos_tokenizer": 2, "not_end_of_generation": [],
                                                   "chat_template_equal": True}}
    return {**base, **changes}


def test_thresholds_by_quantization():
    assert judge(_figures(), "f16") == []
    assert judge(_figures(greedy_agreement=0.5), "f16") and not judge(_figures(greedy_agreement=0.5, perplexity_increase=0.2), "q4_0")
    assert "tokenized 1 of 4" in judge(_figures(prompt_tokens_equal=3), "q4_0")[0]
    assert "chat template" in judge(_figures(template={"passed": False}), "q8_0")[0]
    assert judge(_figures(greedy_agreement=0.3, perplexity_increase=0.3), "q4_K_M") == []


def test_a_file_that_would_not_stop_is_refused():
    """Unsloth's most reported GGUF bug: an eos or end-of-turn token llama.cpp does not stop at."""
    stops = {"eos_gguf": 2, "eos_tokenizer": 2, "not_end_of_generation": [], "chat_template_equal": True}
    assert "eos token is id 0, the tokenizer's id 2" in judge(_figures(stops={**stops, "eos_gguf": 0}), "f16")[0]
    assert "would not stop at the end-of-turn token(s) [7]" in judge(_figures(stops={**stops, "not_end_of_generation": [7]}), "f16")[0]
    assert "not the training template" in judge(_figures(stops={**stops, "chat_template_equal": False}), "f16")[0]
