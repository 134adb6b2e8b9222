"""Tool calls in answers: read out of the generated text (:func:`tunelab.data.tool_parse.parse_tool_calls`, the
parser ``tunelab eval`` scores with) into OpenAI's ``tool_calls``, whole or streamed.

Streaming follows OpenAI's chunks: text deltas as ``content``, then per call one chunk with its ``index``, ``id``,
``type`` and function ``name`` (``arguments`` empty), one with its ``arguments``, and a last chunk with
``finish_reason: "tool_calls"``, which the ``openai`` client's stream helpers reassemble. Text is sent as it is
decoded until a call could begin (``<tool_call>`` or a prefix of it at the end, or an answer that opens like a
bare JSON call); from there it is held back and, once the answer is complete, read as the non-streamed answer
is, so a stream reassembles to the same calls.
"""

from __future__ import annotations

import json
import uuid

from tunelab.data.tool_parse import parse_tool_calls
from tunelab.data.tools import CALL_OPEN
from tunelab.generation import Completion
from tunelab.generation.stops import StopMatcher
from tunelab.serving.protocol import chat_chunk
from tunelab.serving.reasoning import with_reasoning
from tunelab.serving.structured import Plan

_OPENING = StopMatcher((CALL_OPEN,))
_BARE_OPENINGS = ("{", "[", "```", "<|python_tag|>")  # how a Llama-style answer that is one JSON call starts


def openai_calls(text: str) -> tuple[str | None, list[dict]]:
    """The content and the OpenAI ``tool_calls`` of an answer (``arguments`` as a JSON string, a fresh ``id``
    per call); no calls: the text as it is."""
    parsed = parse_tool_calls(text)
    if not parsed.calls:
        return text, []
    calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
              "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
             for c in parsed.calls]
    return parsed.text or None, calls


def answer_of(plan: Plan, opened: bool = False):
    """``chat_response``'s ``answer``: a completion's message (its reasoning as ``reasoning_content``) and finish
    reason under ``plan``; ``opened``: the prompt opened a reasoning block."""

    def answer(completion: Completion) -> tuple[dict, str]:
        message, text = with_reasoning({"role": "assistant"}, completion.text, opened)
        if not plan.parse:
            return {**message, "content": text}, completion.finish_reason
        content, calls = openai_calls(text)
        if not calls:
            return {**message, "content": content}, completion.finish_reason
        finish = "tool_calls" if completion.finish_reason == "stop" else completion.finish_reason
        return {**message, "content": content, "tool_calls": calls}, finish

    return answer


class ToolStream:
    """Decides which streamed text goes out at once and turns the held-back rest into ``tool_calls`` chunks."""

    def __init__(self, plan: Plan):
        self.plan, self.text, self.sent = plan, "", 0

    def feed(self, delta: str) -> str:
        """The text of ``delta`` (and of what was held back) that can be sent now."""
        self.text += delta
        if self.plan.forced:
            return ""
        safe = max(self.sent, self._safe_end())
        out, self.sent = self.text[self.sent:safe], safe
        return out

    def _safe_end(self) -> int:
        text = self.text
        opening = text.lstrip()
        if not opening or any(opening.startswith(o) or o.startswith(opening) for o in _BARE_OPENINGS):
            return 0  # nothing yet, or possibly one bare JSON call: hold until the end
        end = text.find(CALL_OPEN)
        if end < 0:
            end = _OPENING.safe_length(text)  # not a tail that could begin the tag
        return len(text[:end].rstrip())  # parse_tool_calls strips the text around calls: hold trailing blanks

    def finish(self, chunk_id: str, model_id: str, finish: str) -> tuple[list[dict], str]:
        """The chunks still to send (held-back text, then the calls) and the finish reason."""
        content, calls = openai_calls(self.text)
        rest = self.text[self.sent:] if not calls else (content or "")[self.sent:] if (content or "").startswith(
            self.text[:self.sent]) else ""
        chunks = [chat_chunk(chunk_id, model_id, {"content": rest})] if rest else []
        for index, call in enumerate(calls):
            head = {"index": index, "id": call["id"], "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""}}
            chunks.append(chat_chunk(chunk_id, model_id, {"tool_calls": [head]}))
            chunks.append(chat_chunk(chunk_id, model_id, {"tool_calls": [
                {"index": index, "function": {"arguments": call["function"]["arguments"]}}]}))
        return chunks, ("tool_calls" if calls and finish == "stop" else finish)
