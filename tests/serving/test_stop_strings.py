"""Stop strings: the earliest of several wins, a stop may span tokens, and the cost of a decode step does not
grow with the number of stop strings (counted in tokenizer decode calls, not wall time)."""

from __future__ import annotations

import dataclasses
import random

import pytest

from tunelab.generation import SamplingSettings, generate
from tunelab.serving.continuous import ContinuousScheduler
from tunelab.serving.scheduler import Job

ABSENT = tuple(f"\x01\x02never{i}" for i in range(40))  # stop strings the tiny model does not write


class CountingTokenizer:
    """A tokenizer that counts the sequences it decodes and does everything else as the one it wraps."""

    def __init__(self, inner):
        self.inner, self.decoded = inner, 0

    def decode(self, *args, **kwargs):
        self.decoded += 1
        return self.inner.decode(*args, **kwargs)

    def batch_decode(self, sequences, **kwargs):
        self.decoded += len(sequences)
        return self.inner.batch_decode(sequences, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_the_earliest_stop_wins_and_a_tail_that_may_begin_one_is_held():
    from tunelab.generation.stops import StopMatcher

    matcher = StopMatcher(("cd", "bcd", "x", "bcd"))
    assert matcher.cut("abcdx") == ("a", True)  # "bcd" begins before "cd" and "x"
    assert StopMatcher(("ab", "abc")).cut("zabcab") == ("z", True)
    assert matcher.cut("plain") == ("plain", False) and StopMatcher().cut("any") == ("any", False)
    held = StopMatcher(("STOP", "END"))
    assert [held.safe_length(t) for t in ("hello ST", "hello E", "hello", "ab\ufffd", "ENDLESS S")] == [6, 6, 5, 2, 8]


def test_one_pass_finds_what_searching_each_stop_finds():
    from tunelab.generation.stops import StopMatcher

    rng = random.Random(0)
    for _ in range(300):
        stops = tuple("".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 6)))
        text = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 12)))
        positions = [i for i in (text.find(s) for s in stops) if i >= 0]
        assert StopMatcher(stops).find(text) == (min(positions) if positions else -1), (stops, text)
        hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        assert StopMatcher(stops).safe_length(text) == len(text) - hold, (stops, text)


def _decode_alone(registry, tokenizer, settings: SamplingSettings, prompt: str = "Hi"):
    served = dataclasses.replace(registry.get("tiny"), tokenizer=tokenizer)
    scheduler = ContinuousScheduler(registry)
    scheduler.start()
    job = Job(served, [prompt, prompt], settings, tokens=64)
    [answer, _] = scheduler.submit(job).result(60)
    scheduler.stop()
    return answer


def test_a_stop_spanning_two_tokens_cuts_the_answer_before_it_and_the_earliest_wins(registry):
    tokenizer = registry.get("tiny").tokenizer
    full = _decode_alone(registry, tokenizer, SamplingSettings(max_new_tokens=16))
    ids, text = full.token_ids, full.text
    spans = []  # (where, stop) of two characters across a token boundary, first seen there
    for k in range(1, len(ids)):
        before, after = tokenizer.decode(ids[:k]), tokenizer.decode(ids[:k + 1])
        if text.startswith(before) and text.startswith(after) and len(after) > len(before) > 0:
            at = len(before) - 1  # the last character of token k-1 and the first of token k
            if "\ufffd" not in text[at:at + 2] and text.find(text[at:at + 2]) == at:
                spans.append((at, text[at:at + 2]))
    assert spans, f"no two tokens of {text!r} decode to whole characters"
    where, stop = spans[0]
    later = text[where + 2:where + 4]
    stops = (*ABSENT[:3], later, stop) if later and text.find(later) > where else (*ABSENT[:3], stop)
    settings = SamplingSettings(max_new_tokens=16, stop=stops)
    cut = _decode_alone(registry, tokenizer, settings)
    assert cut.text == text[:where] and cut.finish_reason == "stop"
    assert len(cut.token_ids) < len(ids)  # it stopped decoding there, not at max_tokens
    served = registry.get("tiny")
    with registry.lock, served.active() as module:  # generate (the dynamic scheduler) cuts the same
        [plain] = generate(module, served.tokenizer, ["Hi"], settings)
    assert plain.text == cut.text


@pytest.mark.parametrize("streamed", [False, True])
def test_a_decode_step_costs_the_same_with_1_or_40_stop_strings(registry, streamed):
    counts, texts = [], []
    for stops in (ABSENT[:1], ABSENT):
        counting = CountingTokenizer(registry.get("tiny").tokenizer)
        settings = SamplingSettings(max_new_tokens=12, stop=stops)
        if streamed:
            served = dataclasses.replace(registry.get("tiny"), tokenizer=counting)
            scheduler, pieces = ContinuousScheduler(registry), []
            scheduler.start()
            job = Job(served, ["Hi"], settings, tokens=32, on_delta=pieces.append)
            scheduler.submit(job).result(60)
            scheduler.stop()
            texts.append("".join(pieces))
        else:
            texts.append(_decode_alone(registry, counting, settings).text)
        counts.append(counting.decoded)
    assert texts[0] == texts[1] and counts[0] == counts[1] and counts[0] > 0


def test_generate_decodes_once_per_row_and_step_whatever_the_number_of_stops(registry):
    served = registry.get("tiny")
    counts = []
    for stops in (ABSENT[:1], ABSENT):
        counting = CountingTokenizer(served.tokenizer)
        with registry.lock, served.active() as module:
            generate(module, counting, ["Hi", "The quick"], SamplingSettings(max_new_tokens=10, stop=stops))
        counts.append(counting.decoded)
    assert counts[0] == counts[1] > 0
