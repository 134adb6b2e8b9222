"""Where a completion ends: the tokens that end an assistant turn, and stop strings.

``end_of_turn_ids`` reads the end-of-turn token off the chat template itself instead of trusting
``eos_token_id``: they differ for many models (Gemma's ``<end_of_turn>`` vs ``<eos>``, a base model
given the ChatML fallback, Llama 3's ``<|eot_id|>``), and generation that waits for eos repeats a
right answer until ``max_new_tokens`` (seen with the Gemma 3 base model: every answer scored 0).

Stop strings are checked on the decoded *completion* only, by a small ``StoppingCriteria``:
transformers' own ``stop_strings`` also matches across the prompt/completion boundary (it looks at the
whole sequence), which would end a completion on a stop string the model never generated.
"""

from __future__ import annotations

import torch
from transformers import StoppingCriteria

_MARKER = "TUNELABENDOFTURNMARKER"


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, added in tokenizer.added_tokens_decoder.items() if getattr(added, "special", False))
    return ids


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn under ``tokenizer``'s chat template, plus ``eos_token_id``.

    A conversation whose assistant message is a marker string is rendered; the special tokens the template
    puts right after the marker (before any plain text such as a newline) end the turn. A tokenizer without
    a chat template, or a template that cannot render that conversation, gives just the eos token.
    """
    found: list[int] = []
    special = _special_ids(tokenizer)
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARKER}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False) if tokenizer.chat_template else ""
    except Exception:  # noqa: BLE001 - templates raise anything (jinja errors, raise_exception); eos still works
        text = ""
    if isinstance(text, str) and _MARKER in text:
        after = text.split(_MARKER, 1)[1].lstrip()
        for token_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
            if token_id not in special:
                break
            found.append(token_id)
    if tokenizer.eos_token_id is not None:
        found.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(found))  # unique, in order


def longest_stop(stop: tuple[str, ...]) -> int:
    return max((len(s) for s in stop), default=0)


class StopStrings(StoppingCriteria):
    """Ends each row once its completion text (after ``prompt_length``) contains a stop string.

    Only the last few tokens are decoded each step (a stop string of n characters lies within the last n
    tokens plus a little slack for tokens that decode to part of a character), so the check costs the
    same at every step. ``cancelled`` ends every row at the next step (a stream whose reader went away).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_length: int):
        self.tokenizer, self.stop, self.prompt_length = tokenizer, stop, prompt_length
        self.window = longest_stop(stop) + 4
        self.cancelled = False

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.cancelled:
            return done.fill_(True)
        if not self.stop:
            return done
        start = max(self.prompt_length, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[:, start:].tolist(), skip_special_tokens=True)
        for row, tail in enumerate(tails):
            done[row] = any(s in tail for s in self.stop)
        return done


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """(``text`` up to the first occurrence of any stop string, whether one occurred)."""
    positions = [i for i in (text.find(s) for s in stop) if i >= 0]
    if not positions:
        return text, False
    return text[: min(positions)], True


def ids_within(tokenizer, ids: list[int], text: str) -> list[int]:
    """The longest prefix of ``ids`` whose decoded text is a prefix of ``text`` (ids cut at a stop string)."""
    for end in range(len(ids), -1, -1):
        if text.startswith(tokenizer.decode(ids[:end], skip_special_tokens=True)):
            return ids[:end]
    return []
