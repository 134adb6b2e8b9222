"""Soft prompts start from the base model: text initialisation of prompt and prefix tuning.

A prefix initialised from a text must make the model behave exactly as the base model does when it
reads that text first; peft's random initialisation does not (the reason the default changed).
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from tunelab.methods import get_method
from tunelab.methods.prompt_tuning import PrefixOptions, PromptOptions, text_token_ids
from tunelab.models.load import load_model

INPUT = [[5, 6, 7, 8, 9, 10, 11]]


def _prefixed_and_reference(model_dir, options: PrefixOptions):
    torch.manual_seed(0)
    base = load_model(str(model_dir), "float32")
    tuned = get_method("prefix").apply(base, options).eval()
    text_ids = text_token_ids(base, options.init_text, options.num_virtual_tokens)
    ids = torch.tensor(INPUT)
    with torch.no_grad():
        prefixed = tuned(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        with tuned.disable_adapter():
            reference = tuned(input_ids=torch.tensor([text_ids + INPUT[0]])).logits[:, len(text_ids):]
    return prefixed, reference


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
def test_prefix_from_text_is_the_base_model_reading_the_text(arch, request):
    """Grouped-query attention (2 kv heads of 4) included: the layout must match peft's view of the prefix."""
    prefixed, reference = _prefixed_and_reference(request.getfixturevalue(arch), PrefixOptions(num_virtual_tokens=6, init_text="colour of the sky"))
    torch.testing.assert_close(prefixed, reference, atol=1e-5, rtol=1e-5)


def test_random_prefix_is_not(tiny_llama):
    prefixed, reference = _prefixed_and_reference(tiny_llama, PrefixOptions(num_virtual_tokens=6, init="random"))
    assert (prefixed - reference).abs().max() > 1e-3


def test_init_text_is_repeated_or_cut_to_the_prefix_length(tiny_llama):
    base = load_model(str(tiny_llama), "float32")
    once = text_token_ids(base, "ab", 100)
    assert len(once) == 100 and len(text_token_ids(base, "a much longer text than four tokens", 4)) == 4


def test_prefix_init_defaults_follow_projection():
    assert PrefixOptions().from_text and not PrefixOptions(projection=True).from_text
    with pytest.raises(ValidationError, match="projection"):
        PrefixOptions(projection=True, init="text")


def test_prompt_from_text_starts_from_the_texts_embeddings(tiny_llama):
    torch.manual_seed(0)
    base = load_model(str(tiny_llama), "float32")
    options = PromptOptions(num_virtual_tokens=5, init_text="hello there")
    text_ids = text_token_ids(base, options.init_text, 5)
    expected = base.get_input_embeddings().weight[text_ids].detach().clone()
    tuned = get_method("prompt").apply(base, options)
    torch.testing.assert_close(tuned.prompt_encoder["default"].embedding.weight.detach(), expected)
