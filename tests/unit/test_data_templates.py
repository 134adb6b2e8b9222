"""Choosing the chat template and preparing the tokenizer for it."""

from __future__ import annotations

import pytest

from tunelab.data import CHATML_TEMPLATE, NAMED_TEMPLATES, prepare_tokenizer
from tunelab.errors import TunelabError
from tunelab.models.tiny import build_tiny_tokenizer

OWN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def bare_tokenizer(eos: str | None = "<eos>", pad: str | None = None):
    """A tiny fast tokenizer without ChatML tokens or chat template (trains in milliseconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=[t for t in (eos, pad) if t],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(["hello world, how are you?"] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, pad_token=pad)


def test_registry_uses_the_one_chatml_definition():
    from tunelab.models import tiny

    assert NAMED_TEMPLATES["chatml"] is CHATML_TEMPLATE is tiny.CHATML_TEMPLATE


def test_auto_falls_back_to_chatml_and_adds_missing_tokens():
    tok = bare_tokenizer()
    n = len(tok)
    added = prepare_tokenizer(tok, "auto")
    assert added == ["<|im_start|>", "<|im_end|>"]
    assert tok.chat_template == CHATML_TEMPLATE
    assert len(tok) == n + 2
    # The markers are single, unsplittable tokens now, and the end of turn is what stops generation.
    assert tok("<|im_start|>hi<|im_end|>", add_special_tokens=False).input_ids[0] == tok.convert_tokens_to_ids(
        "<|im_start|>"
    )
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"


def test_auto_falls_back_to_chatml_without_adding_when_tokens_exist():
    tok = build_tiny_tokenizer(chat_template=None)
    n = len(tok)
    assert prepare_tokenizer(tok) == []
    assert tok.chat_template == CHATML_TEMPLATE and len(tok) == n
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<pad>"


def test_auto_keeps_own_template():
    tok = build_tiny_tokenizer(chat_template=OWN)
    assert prepare_tokenizer(tok, "auto") == []
    assert tok.chat_template == OWN
    assert prepare_tokenizer(tok, "tokenizer") == []
    assert tok.chat_template == OWN


def test_tokenizer_choice_requires_own_template():
    with pytest.raises(TunelabError, match="data.chat_template=chatml"):
        prepare_tokenizer(build_tiny_tokenizer(chat_template=None), "tokenizer")


def test_named_file_and_inline_templates(tmp_path):
    tok = build_tiny_tokenizer(chat_template=OWN)
    prepare_tokenizer(tok, "chatml")
    assert tok.chat_template == CHATML_TEMPLATE
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}", encoding="utf-8")
    prepare_tokenizer(tok, str(path))
    assert tok.chat_template == path.read_text(encoding="utf-8")
    prepare_tokenizer(tok, OWN)
    assert tok.chat_template == OWN


def test_bad_choices_are_explained(tmp_path):
    tok = build_tiny_tokenizer()
    with pytest.raises(TunelabError, match="chatml.*jinja"):
        prepare_tokenizer(tok, "vicuna")
    with pytest.raises(TunelabError, match="cannot read"):
        prepare_tokenizer(tok, str(tmp_path / "missing.jinja"))
    with pytest.raises(TunelabError, match="invalid Jinja"):
        prepare_tokenizer(tok, "{% for m in messages %}")


def test_pad_falls_back_to_eos_without_new_tokens():
    tok = bare_tokenizer(eos="<eos>")
    tok.chat_template = OWN
    n = len(tok)
    assert prepare_tokenizer(tok) == []
    assert tok.pad_token == "<eos>" and len(tok) == n


def test_no_eos_and_no_pad_is_an_error():
    tok = bare_tokenizer(eos=None)
    tok.chat_template = OWN
    with pytest.raises(TunelabError, match="neither a pad nor an eos"):
        prepare_tokenizer(tok)


def gemma_tokenizer():
    """A tiny tokenizer with Gemma's markers as special tokens and no chat template, like the Gemma 3 base model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(["hello world, how are you? user model"] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>",
                                   additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])


GEMMA_TEXT = ("<bos><start_of_turn>user\nBe brief.\n\nhello<end_of_turn>\n"
              "<start_of_turn>model\nworld<end_of_turn>\n<start_of_turn>user\nhow?<end_of_turn>\n")


def test_auto_uses_gemma_markers_the_vocabulary_has_and_adds_nothing():
    from tunelab.data.templates import GEMMA_TEMPLATE

    tok = gemma_tokenizer()
    n = len(tok)
    assert NAMED_TEMPLATES["gemma"] is GEMMA_TEMPLATE
    assert prepare_tokenizer(tok, "auto") == []
    assert tok.chat_template == GEMMA_TEMPLATE and len(tok) == n
    assert tok.eos_token == "<end_of_turn>" and tok.pad_token == "<pad>"  # generation stops at the end of the turn
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "world"}, {"role": "user", "content": "how?"}]
    full = tok.apply_chat_template(messages, tokenize=False)
    assert full == GEMMA_TEXT  # the system prompt is folded into the first user turn, as Gemma does
    for cut in range(1, len(messages)):  # the loss mask needs every prefix render to be a prefix
        assert full.startswith(tok.apply_chat_template(messages[:cut], tokenize=False))
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("hello<end_of_turn>\n<start_of_turn>model\n") and full.startswith(prompt)
    alone = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert alone == "<bos><start_of_turn>user\nBe brief.\n\n<end_of_turn>\n<start_of_turn>model\n"


def test_gemma_template_trains_the_answer_and_its_end_of_turn():
    from tunelab.data import Example, tokenize_examples

    tok = gemma_tokenizer()
    prepare_tokenizer(tok, "auto")
    example = Example(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                       {"role": "assistant", "content": "world"}), "t:1")
    [encoded], stats = tokenize_examples([example], tok)
    trained = [t for t in encoded.labels if t != -100]
    assert tok.decode(trained) == "world<end_of_turn>"  # no extra eos: <end_of_turn> is the stop token
    assert encoded.input_ids[0] == tok.convert_tokens_to_ids("<bos>")
    assert stats.tokens_by_role.get("system", 0) > 0  # the system text is attributed to the system message


def test_auto_prefers_chatml_when_both_families_are_in_the_vocabulary():
    tok = gemma_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    n = len(tok)
    assert prepare_tokenizer(tok, "auto") == [] and tok.chat_template == CHATML_TEMPLATE and len(tok) == n


def test_long_single_line_inline_template_is_not_taken_for_a_file_name():
    tok = build_tiny_tokenizer(chat_template=OWN)
    inline = "{% for m in messages %}" + "{{ m['role'] }}: {{ m['content'] }}" * 12 + "{% endfor %}"
    assert len(inline) > 300 and "\n" not in inline
    prepare_tokenizer(tok, inline)
    assert tok.chat_template == inline
    with pytest.raises(TunelabError, match="not a known template"):
        prepare_tokenizer(tok, "x" * 300)


@pytest.mark.parametrize("fixture", ["tiny_base_llama", "tiny_base_qwen2"])  # untied and tied embeddings
def test_adapter_with_added_tokens_holds_only_their_rows_and_reloads_exactly(fixture, request, tmp_path):
    import torch
    from safetensors import safe_open

    from tunelab.evaluation.run import load_for_eval
    from tunelab.methods import get_method
    from tunelab.models.load import load_model, load_tokenizer

    base_dir = str(request.getfixturevalue(fixture))
    tok = load_tokenizer(base_dir)
    added = prepare_tokenizer(tok, "auto")
    assert added == ["<|im_start|>", "<|im_end|>"]
    model = load_model(base_dir)
    model.resize_token_embeddings(len(tok))
    method = get_method("lora")
    options = method.options_class(r=4, trainable_token_indices=tok.convert_tokens_to_ids(added))
    tuned = method.apply(model, options)
    torch.manual_seed(1)
    with torch.no_grad():  # stands in for training: every trainable tensor (LoRA B starts at zero) moves
        for param in (p for p in tuned.parameters() if p.requires_grad):
            param.add_(torch.randn_like(param) * 0.5)
    artifact = tmp_path / "adapter"
    tok.save_pretrained(artifact)
    method.save(tuned, artifact)

    with safe_open(artifact / "adapter_model.safetensors", "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert not [k for k, s in shapes.items() if len(tok) in s], shapes  # no whole embedding matrix
    rows = [s for k, s in shapes.items() if "trainable_tokens" in k]
    assert rows and all(s[0] == 2 for s in rows)  # only the two added rows (per untied layer)

    ids = torch.tensor([tok("<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n").input_ids])
    tuned.eval()
    with torch.no_grad():
        expected = tuned(input_ids=ids).logits
    torch.manual_seed(123)  # the reloaded base gets other random rows for the added tokens
    loaded = load_for_eval(base_dir, adapter=str(artifact))
    loaded.model.eval()
    with torch.no_grad():
        got = loaded.model(input_ids=ids).logits
    assert got.shape == expected.shape and torch.equal(got, expected)
