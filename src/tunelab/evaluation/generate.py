"""Batched greedy generation rendered with the same chat template as training.

Prompts are left-padded so every row's continuation starts at the same column; generation stops at the
tokenizer's end-of-turn / eos token.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_answers(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy answers to each conversation (a list of messages ending with a user turn).

    Args:
        model: A causal LM (plain or PEFT-wrapped).
        tokenizer: The tokenizer whose chat template was used in training.
        conversations: Message lists; the assistant reply is generated after the last message.
        max_new_tokens: Upper bound on the answer length.
        batch_size: Prompts per generate call.
    """
    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = []
    try:
        for start in range(0, len(conversations), batch_size):
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations[start : start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, use_cache=True)
            new_tokens = out[:, enc["input_ids"].shape[1] :]  # (B, generated)
            answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens]
    finally:
        tokenizer.padding_side = side
    return answers
