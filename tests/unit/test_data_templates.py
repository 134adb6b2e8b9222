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
