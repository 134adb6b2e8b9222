"""Where a completion ends: the tokens that end an assistant turn, and stop strings.

``end_of_turn_ids`` reads the end-of-turn token off the chat template itself instead of trusting
``eos_token_id``: they differ for many models (Gemma's ``<end_of_turn>`` vs ``<eos>``, a base model
given the ChatML fallback, Llama 3's ``<|eot_id|>``), and generation that waits for eos repeats a
right answer until ``max_new_tokens`` (seen with the Gemma 3 base model: every answer scored 0).

Stop strings are checked on the decoded *completion* only, by a small ``StoppingCriteria``:
transformers' own ``stop_strings`` also matches across the prompt/completion boundary (it looks at the
whole sequence), which would end a completion on a stop string the model never generated.

:class:`StopMatcher` finds the earliest of any number of stop strings in one pass: each step decodes a row's
tail once and searches it with one compiled alternation (``re``, in C), so the cost of a step does not grow
with the number of stop strings (10,000 of them took 38-115 s per request when the tail was decoded once per
stop string). No extra dependency: the standard library's ``re`` and ``bisect`` do the job.
"""

from __future__ import annotations

import bisect
import re
from typing import Callable, Union

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


class StopMatcher:
    """The stop strings of one request, searched together.

    Args:
        stop: The stop strings (any number; duplicates are fine).

    Attributes:
        window: Tokens to decode at the end of a completion to see any stop string that ends there (a stop
            of n characters lies within the last n tokens, plus slack for tokens that decode to part of a
            character).
    """

    def __init__(self, stop: tuple[str, ...] = ()):
        self.stop = tuple(stop)
        self.longest = longest_stop(self.stop)
        self.window = self.longest + 4
        # Longest first, so that of two stops starting at one place the longer is the one reported.
        ordered = sorted(set(self.stop), key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None
        self._sorted = sorted(set(self.stop))  # for "is this a prefix of a stop" by bisection

    def __bool__(self) -> bool:
        return bool(self.stop)

    def find(self, text: str) -> int:
        """Where the earliest stop string in ``text`` begins, -1 when none occurs."""
        if self._pattern is None:
            return -1
        found = self._pattern.search(text)
        return -1 if found is None else found.start()

    def cut(self, text: str) -> tuple[str, bool]:
        """(``text`` up to the first occurrence of any stop string, whether one occurred)."""
        at = self.find(text)
        return (text, False) if at < 0 else (text[:at], True)

    def _begins_a_stop(self, piece: str) -> bool:
        """Whether ``piece`` is a proper prefix of some stop string (the stops that begin with it sort together)."""
        i = bisect.bisect_left(self._sorted, piece)
        if i < len(self._sorted) and self._sorted[i] == piece:
            i += 1
        return i < len(self._sorted) and self._sorted[i].startswith(piece)

    def safe_length(self, text: str) -> int:
        """How much of ``text`` can be sent: not a trailing partial character, nor a tail that could begin a
        stop string (checked against all stops at once, by bisection in the sorted stops)."""
        end = len(text)
        while end and text[end - 1] == "\ufffd":
            end -= 1
        for k in range(min(self.longest - 1, end), 0, -1):  # the longest tail that begins some stop string
            if self._begins_a_stop(text[end - k:end]):
                return end - k
        return end


Stops = Union[tuple[str, ...], StopMatcher]


def as_matcher(stop: Stops) -> StopMatcher:
    """``stop`` as a :class:`StopMatcher` (built once per request, not per token)."""
    return stop if isinstance(stop, StopMatcher) else StopMatcher(stop)


class StopStrings(StoppingCriteria):
    """Ends each row once its completion text (after ``prompt_length``) contains a stop string.

    Only the last few tokens are decoded each step (:attr:`StopMatcher.window`), once per row, and searched
    for every stop string at once, so the check costs the same at every step whatever the number of stops.
    ``cancelled`` (or ``should_stop()`` returning True) ends every row at the next step (a stream whose reader
    went away, a server past its shutdown deadline).
    """

    def __init__(self, tokenizer, stop: Stops, prompt_length: int, should_stop: Callable[[], bool] | None = None):
        self.tokenizer, self.matcher, self.prompt_length = tokenizer, as_matcher(stop), prompt_length
        self.should_stop = should_stop
        self.cancelled = False

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.cancelled or (self.should_stop is not None and self.should_stop()):
            return done.fill_(True)
        if not self.matcher:
            return done
        start = max(self.prompt_length, input_ids.shape[1] - self.matcher.window)
        tails = self.tokenizer.batch_decode(input_ids[:, start:].tolist(), skip_special_tokens=True)
        for row, tail in enumerate(tails):
            done[row] = self.matcher.find(tail) >= 0
        return done


def cut_at_stop(text: str, stop: Stops) -> tuple[str, bool]:
    """(``text`` up to the first occurrence of any stop string, whether one occurred)."""
    return as_matcher(stop).cut(text)


def ids_within(tokenizer, ids: list[int], text: str) -> list[int]:
    """The longest prefix of ``ids`` whose decoded text is a prefix of ``text`` (ids cut at a stop string)."""
    for end in range(len(ids), -1, -1):
        if text.startswith(tokenizer.decode(ids[:end], skip_special_tokens=True)):
            return ids[:end]
    return []
