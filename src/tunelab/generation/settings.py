"""Value types of the decoding component: what to sample (:class:`SamplingSettings`) and what came out
(:class:`Completion`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tunelab.errors import TunelabError

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingSettings:
    """How to decode.

    Attributes:
        temperature: 0 decodes greedily; above 0 samples from the softmax at this temperature.
        top_p: Nucleus sampling: sample only among the most likely tokens whose probabilities sum to ``top_p``
            (1 keeps every token). Ignored when greedy. No top-k cut is applied.
        max_new_tokens: Upper bound on the tokens generated per prompt.
        seed: Seed for sampling, so the same seed (and batch size) gives the same outputs; None uses the
            global random state. The global state is left as it was either way.
        stop: Strings that end a completion at their first occurrence (not included in the text).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a single string would otherwise stop at each of its characters
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        problems = []
        if not self.temperature >= 0:
            problems.append(f"temperature {self.temperature!r}: use 0 (greedy) or a positive number")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p {self.top_p!r}: use a number in (0, 1]")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            problems.append(f"max_new_tokens {self.max_new_tokens!r}: use a positive integer")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop {self.stop!r}: every stop string must be a non-empty string")
        if problems:
            raise TunelabError("sampling settings: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Completion:
    """One generated continuation.

    Attributes:
        token_ids: The generated ids. When an end-of-turn (stop) token ended the completion it is the last
            id (training on completions, as GRPO does, needs it); when a stop string ended it, the ids stop
            before the token where the stop string begins.
        text: The decoded completion without special tokens, the stop token or the stop string.
        finish_reason: "stop" (a stop token or stop string) or "length" (``max_new_tokens`` reached).
        prompt_tokens: Number of tokens of the rendered prompt (without padding).
    """

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
