"""Streaming one completion as text deltas: ``model.generate`` runs in a thread and pushes tokens to a streamer.

The streamer is ours rather than transformers' ``TextIteratorStreamer`` because that one re-decodes from
the last newline (so the pieces need not add up to the decode of all tokens for every tokenizer) and knows
nothing of stop strings. Here each delta is the growth of the decoded completion, held back while it ends
in a partial character or could be the start of a stop string; the deltas therefore add up to exactly the
text :func:`tunelab.generation.generate` returns for the same greedy settings.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import torch
from transformers.generation.streamers import BaseStreamer

from tunelab.generation.constrain import Grammar, GrammarMask, row_matchers
from tunelab.generation.generate import (Prompt, constrained_kwargs, generate_kwargs, left_pad, model_device, pad_id,
                                         render_prompt, seeded)
from tunelab.generation.settings import SamplingSettings
from tunelab.generation.stops import StopMatcher, Stops, StopStrings, as_matcher, end_of_turn_ids

_DONE = object()


class _DeltaStreamer(BaseStreamer):
    """Receives generated ids from ``generate`` (the prompt first, which it skips) and queues them."""

    def __init__(self, stop_ids: set[int]):
        self.stop_ids, self.queue, self.seen_prompt = stop_ids, queue.Queue(), False
        self.finished = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        if self.finished:
            return
        for t in value.reshape(-1).tolist():
            if t in self.stop_ids:  # the end of the turn: nothing after it belongs to this completion
                self.finished = True
                break
            self.queue.put(t)

    def end(self) -> None:
        self.queue.put(_DONE)


def safe_length(text: str, stop: Stops) -> int:
    """How much of ``text`` can be sent: not a trailing partial character, nor a tail that could begin a stop string."""
    return as_matcher(stop).safe_length(text)


def stream(model, tokenizer, prompt: Prompt, settings: SamplingSettings | None = None, *,
           stop_token_ids: list[int] | None = None, constraint: Grammar | None = None) -> Iterator[str]:
    """Text deltas of the completion of one prompt, as they are generated.

    Args:
        model: A causal LM, plain or PEFT-wrapped.
        tokenizer: The tokenizer whose chat template was used in training.
        prompt: A conversation ending with a user turn, or an already-rendered string.
        settings: Sampling settings; default greedy, 128 new tokens.
        stop_token_ids: Tokens that end the completion; default :func:`end_of_turn_ids` of the tokenizer.
        constraint: A grammar the completion must follow (:mod:`tunelab.generation.constrain`), or None.

    Yields:
        Pieces of text whose concatenation is the completion's text. Closing the iterator early stops
        the generation at its next step.
    """
    settings = settings or SamplingSettings()
    stop_ids = list(stop_token_ids) if stop_token_ids is not None else end_of_turn_ids(tokenizer)
    pad = pad_id(tokenizer, stop_ids)
    device = model_device(model)
    input_ids, attention_mask = left_pad([render_prompt(tokenizer, prompt)], pad, device)
    streamer, matcher = _DeltaStreamer(set(stop_ids)), StopMatcher(settings.stop)
    criteria = StopStrings(tokenizer, matcher, input_ids.shape[1])
    grammars = row_matchers(tokenizer, [constraint], stop_ids)
    kwargs = constrained_kwargs(settings, generate_kwargs(settings, stop_ids, pad),
                                GrammarMask(grammars, input_ids.shape[1]) if grammars else None)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad(), seeded(settings.seed, device):  # grad mode is per thread
                model.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=streamer,
                               stopping_criteria=[criteria], **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the reading thread below
            failure.append(exc)
            streamer.end()

    was_training = model.training
    model.eval()
    thread = threading.Thread(target=run, name="tunelab-generate-stream", daemon=True)
    thread.start()
    try:
        yield from _deltas(tokenizer, streamer, matcher)
    finally:
        criteria.cancelled = True
        thread.join()
        model.train(was_training)
    if failure:
        raise failure[0]


def _deltas(tokenizer, streamer: _DeltaStreamer, stop: StopMatcher) -> Iterator[str]:
    """Decode the growing completion and yield what became safe to send since the last delta."""
    ids: list[int] = []
    sent = 0
    while True:
        item = streamer.queue.get()
        if item is _DONE:
            break
        ids.append(item)
        text, hit = stop.cut(tokenizer.decode(ids, skip_special_tokens=True))
        if hit:
            if len(text) > sent:
                yield text[sent:]
            sent = len(text)
            return
        safe = stop.safe_length(text)
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    text, _ = stop.cut(tokenizer.decode(ids, skip_special_tokens=True))
    if len(text) > sent:
        yield text[sent:]
