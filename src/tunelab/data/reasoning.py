"""Thinking traces: an assistant's reasoning before its answer, in records, in training and in what the model says.

A record carries the reasoning as the assistant message's ``reasoning_content`` (the field vLLM's and DeepSeek's
APIs use) or inline, as a ``<think>...</think>`` block at the start of its ``content``. The model's own chat
template decides how it renders: a template that renders ``reasoning_content`` (Qwen3, SmolLM3, DeepSeek-R1
distills) gets the message as it is, and may strip the reasoning of earlier turns, as those models are served;
any other template (SmolLM2, Gemma) gets the **fallback**: the reasoning written inline, ``<think>\\n{reasoning}
\\n</think>\\n\\n{answer}``, which evaluation and serving read back with :func:`split_reasoning`.

``data.train_on_reasoning`` (default true) keeps the reasoning in the loss; false trains the answer only (the
reasoning is context). A template that rewrites earlier turns (Qwen3 strips their reasoning) cannot be cut into
per-message spans, so such a conversation trains its final answer only (:mod:`tunelab.data.tokenize` says how
many); split a multi-turn conversation into one record per answer to train every turn with its reasoning.

No library does this for an arbitrary template (TRL and LLaMA-Factory keep per-model template code), hence this
module; the probe is the template itself, rendered once with a marker.
"""

from __future__ import annotations

import re
from functools import lru_cache

REASONING_KEY = "reasoning_content"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_PROBE = "tunelab-reasoning-probe"
_LEADING_THINK = re.compile(r"\s*<think>(.*?)</think>\s*", re.S)


def has_reasoning(messages) -> bool:
    """Any assistant message carries reasoning (the field, or a leading ``<think>`` block)."""
    return any(m.get("role") == "assistant" and (m.get(REASONING_KEY) or _LEADING_THINK.match(m.get("content") or ""))
               for m in messages)


def renders_reasoning(tokenizer) -> bool:
    """The tokenizer's chat template renders an answer's ``reasoning_content`` (probed once per template)."""
    return bool(tokenizer.chat_template) and _probe(tokenizer, str(tokenizer.chat_template))


@lru_cache(maxsize=32)
def _probe(tokenizer, template: str) -> bool:
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", REASONING_KEY: _PROBE}]
    try:
        return _PROBE in tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # a template that refuses the probe does not render reasoning
        return False


def reasoning_view(messages: list[dict], tokenizer) -> list[dict]:
    """The messages as the template is given them: unchanged where it renders ``reasoning_content``, else with the
    reasoning folded into the content (the fallback). Inline ``<think>`` blocks are left to the template either way."""
    if not any(m.get(REASONING_KEY) for m in messages) or renders_reasoning(tokenizer):
        return messages
    return [fold(m) if m.get(REASONING_KEY) else m for m in messages]


def fold(message: dict) -> dict:
    """An assistant message with its ``reasoning_content`` written inline before the answer."""
    out = {k: v for k, v in message.items() if k != REASONING_KEY}
    reasoning = message[REASONING_KEY].strip("\n")
    out["content"] = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{(message.get('content') or '').lstrip()}"
    return out


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a model's output: what precedes ``</think>`` is the reasoning (the opening
    tag may be in the prompt, as thinking templates put it in the generation prompt); no closing tag, no reasoning."""
    if THINK_CLOSE not in text:
        return None, text
    reasoning, answer = text.split(THINK_CLOSE, 1)
    reasoning = reasoning.strip()
    if reasoning.startswith(THINK_OPEN):
        reasoning = reasoning[len(THINK_OPEN):]
    return reasoning.strip(), answer.strip()


def answer_start(full: str, head: int, end: int) -> int:
    """Where the answer begins inside the trained span ``full[head:end]``: after its reasoning block and the
    whitespace that follows it; ``head`` if the span has no reasoning."""
    close = full.find(THINK_CLOSE, head, end)
    if close < 0:
        return head
    start = close + len(THINK_CLOSE)
    while start < end and full[start].isspace():
        start += 1
    return start
