"""Greedy answers for evaluation, through the shared decoding component (:mod:`tunelab.generation`).

Prompts are rendered with the same chat template as training and left-padded; generation stops at the
tokens that end an assistant turn under that template (and at eos), not only at eos.
"""

from __future__ import annotations

from tunelab.generation import SamplingSettings, generate


def generate_answers(model, tokenizer, conversations: list[list[dict] | str], *, max_new_tokens: int = 32,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers to each conversation (a list of messages ending with a user turn), or continuations of
    rendered text (a string).

    Args:
        model: A causal LM (plain or PEFT-wrapped).
        tokenizer: The tokenizer whose chat template was used in training.
        conversations: Message lists (the assistant reply is generated after the last message) or strings.
        max_new_tokens: Upper bound on the answer length.
        batch_size: Prompts per generate call.
    """
    settings = SamplingSettings(temperature=0.0, max_new_tokens=max_new_tokens)
    completions = generate(model, tokenizer, conversations, settings, batch_size=batch_size)
    return [c.text.strip() for c in completions]
