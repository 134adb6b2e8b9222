"""Served reasoning: a chat answer's reasoning comes back as ``reasoning_content`` (vLLM's field), the answer after it
as ``content``; the stream's ``reasoning_content`` and ``content`` deltas add up to the same split, at every cut."""

from __future__ import annotations

import pytest

from tunelab.generation import Completion
from tunelab.serving.reasoning import ReasoningStream, opens_reasoning, reasoning_parts
from tunelab.serving.structured import Plan
from tunelab.serving.toolcalls import answer_of

OUTPUTS = [
    ("<think>\n2 plus 3 is 5.\n</think>\n\n5.", False, ("2 plus 3 is 5.", "5.")),
    ("  <think>a  b</think>answer ", False, ("a  b", "answer ")),
    ("text first <think>no</think> more", False, (None, "text first <think>no</think> more")),
    ("2 plus 3\n</think>\n\n5.", True, ("2 plus 3", "5.")),  # the prompt opened the block
    ("<think>\ncut off mid-thought ", False, ("cut off mid-thought", "")),
    ("no reasoning at all", False, (None, "no reasoning at all")),
    ("<thin", False, (None, "<thin")),
    ("", False, (None, "")),
    ("", True, (None, "")),
]


def _streamed(text: str, opened: bool, cuts: list[int]) -> tuple[str | None, str]:
    stream, reasoning, answer = ReasoningStream(opened), [], []
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        r, t = stream.feed(text[a:b])
        reasoning.append(r)
        answer.append(t)
    r, t = stream.finish()
    return "".join(reasoning) + r or None, "".join(answer) + t


@pytest.mark.parametrize("text, opened, expected", OUTPUTS)
def test_whole_and_streamed_splits_agree_at_every_cut(text, opened, expected):
    whole = reasoning_parts(text, opened)
    assert (whole[0] or None, whole[1]) == expected
    for cut in range(len(text) + 1):
        for cuts in ([cut], list(range(1, len(text), 3))):
            got = _streamed(text, opened, cuts)
            assert got == (expected[0] or None, expected[1]), (cuts, got)


def test_the_answer_carries_reasoning_content_beside_tool_calls():
    plain = Completion(token_ids=[1], text="<think>\nr\n</think>\n\n5.", finish_reason="stop", prompt_tokens=3)
    message, finish = answer_of(Plan())(plain)
    assert message == {"role": "assistant", "reasoning_content": "r", "content": "5."} and finish == "stop"
    calling = Completion(token_ids=[1], text='<think>look it up</think>\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n'
                         "</tool_call>", finish_reason="stop", prompt_tokens=3)
    message, finish = answer_of(Plan(tools=[{"type": "function", "function": {"name": "f"}}], parse=True))(calling)
    assert message["reasoning_content"] == "look it up" and finish == "tool_calls"
    assert message["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}


def test_a_generation_prompt_that_opens_the_block_is_seen():
    from tunelab.models.tiny import build_tiny_tokenizer

    opening = build_tiny_tokenizer(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}"
                                                 "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    assert opens_reasoning(opening)
    assert not opens_reasoning(build_tiny_tokenizer())
