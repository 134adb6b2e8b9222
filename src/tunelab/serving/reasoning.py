"""An answer's reasoning as OpenAI-compatible servers return it: the message's ``reasoning_content`` (vLLM's field),
the answer after it in ``content``; streamed as ``reasoning_content`` deltas, then ``content`` deltas.

The reasoning is a ``<think>`` block at the start of the output, up to ``</think>`` (as evaluation reads it,
:func:`tunelab.data.reasoning.split_reasoning`); the opening tag is in the output, or in the prompt when the
template's generation prompt opens the block itself (DeepSeek-R1 distills). An output that opens no block answers
in ``content`` only. Hand-written because the split must follow tunelab's rendering of the same templates.
"""

from __future__ import annotations

from functools import lru_cache

from tunelab.data.reasoning import THINK_CLOSE, THINK_OPEN
from tunelab.data.tool_render import render_chat
from tunelab.generation.stops import StopMatcher

_CLOSING = StopMatcher((THINK_CLOSE,))


def opens_reasoning(tokenizer) -> bool:
    """The template's generation prompt ends inside an opened ``<think>`` block (DeepSeek-R1 distills); a property of
    the template, probed once per template rather than rendered again for every request."""
    return bool(tokenizer.chat_template) and _opens(tokenizer, str(tokenizer.chat_template))


@lru_cache(maxsize=32)
def _opens(tokenizer, template: str) -> bool:
    try:
        return render_chat(tokenizer, [{"role": "user", "content": "q"}], add_generation_prompt=True).rstrip().endswith(THINK_OPEN)
    except Exception:  # a template that refuses the probe: the request's own rendering reports it
        return False


def reasoning_parts(text: str, opened: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a whole output: the reasoning is a ``<think>`` block at its start (or from its
    start, when the prompt ``opened`` the block) up to ``</think>``; a block never closed (the output was cut off)
    is all reasoning. As the stream splits it."""
    head = text.lstrip()
    if not opened:
        if not head.startswith(THINK_OPEN):
            return None, text
        head = head[len(THINK_OPEN):]
    if THINK_CLOSE not in head:
        return head.strip(), ""
    reasoning, answer = head.split(THINK_CLOSE, 1)
    return reasoning.strip(), answer.lstrip()


def with_reasoning(message: dict, text: str, opened: bool = False) -> tuple[dict, str]:
    """``message`` with the reasoning of ``text`` as ``reasoning_content``, and the answer text that follows it."""
    reasoning, answer = reasoning_parts(text, opened)
    if reasoning is None:
        return message, text
    return {**message, "reasoning_content": reasoning}, answer


class ReasoningStream:
    """Splits streamed text into reasoning deltas (before ``</think>``) and answer deltas (after it), as
    :func:`reasoning_parts` splits the whole text."""

    def __init__(self, opened: bool = False):
        self.text, self.sent, self.started, self.blank = "", 0, False, False
        self.state = "thinking" if opened else "start"

    def feed(self, delta: str) -> tuple[str, str]:
        """``(reasoning delta, answer delta)`` that can be sent now."""
        if self.state == "answer":
            return "", self._answer(delta)
        self.text += delta
        if self.state == "start":
            head = self.text.lstrip()
            if not head or THINK_OPEN.startswith(head):
                return "", ""  # maybe the opening tag: hold
            if not head.startswith(THINK_OPEN):
                self.state = "answer"
                return "", self.text
            self.state, self.sent = "thinking", self.text.index(THINK_OPEN) + len(THINK_OPEN)
        close = self.text.find(THINK_CLOSE, self.sent)
        if close >= 0:
            self.state, self.blank = "answer", True
            return self._reasoning(close), self._answer(self.text[close + len(THINK_CLOSE):])
        return self._reasoning(_CLOSING.safe_length(self.text)), ""  # not a tail that could begin the tag

    def _answer(self, delta: str) -> str:
        """The answer's text: after a reasoning block, without the blanks that begin it."""
        if self.blank:
            delta = delta.lstrip()
            self.blank = not delta
        return delta

    def _reasoning(self, end: int) -> str:
        """The reasoning up to ``end`` not sent yet, without the blanks that may end it (held back)."""
        end = self.sent + len(self.text[self.sent:end].rstrip())
        out = self.text[self.sent:end]
        if not self.started:
            out = out.lstrip()
        if out:
            self.sent, self.started = end, True
        return out

    def finish(self) -> tuple[str, str]:
        """``(reasoning, answer)`` still held when the output ends."""
        if self.state == "answer":
            return "", ""
        if self.state == "start":
            return "", self.text
        rest = self.text[self.sent:]
        return (rest.rstrip() if self.started else rest.strip()), ""
