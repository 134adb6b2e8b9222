"""Constrained decoding: a grammar (a JSON schema, or a Lark grammar that embeds JSON schemas) masks the
logits of each row, so the text generated always belongs to the grammar's language.

The grammar engine is **llguidance** (guidance-ai; the engine behind vLLM's, SGLang's and llama.cpp's
structured outputs), chosen over xgrammar and outlines-core because:

* it runs entirely on the CPU (Rust, no CUDA kernel needed to apply a mask) and wraps any fast Hugging Face
  tokenizer in one call (``llguidance.hf.from_tokenizer``), byte-level BPEs included;
* grammars compile lazily in milliseconds (a tool-call grammar over SmolLM2's 49k vocabulary: ~10 ms, a
  300-property schema ~15 ms on the 2-core CPU), and a mask costs ~0.03-0.06 ms a token, so there is no
  compile cache to keep and no step to precompute per schema;
* its Lark front end embeds JSON schemas (``%json {...}``), which is exactly what a tool call is: fixed text
  (``<tool_call>``) around a JSON object whose ``arguments`` follow the function's parameter schema;
* it bounds its own work (:class:`llguidance.LLParserLimits`: grammar size, lexer fuel), so a hostile
  schema fails to compile instead of stalling the server.

What is ours is only the glue: a matcher per row, the mask applied to that row's logits before temperature
and top-p (a mask applied after top-p could leave no token at all), and the end-of-turn tokens given to the
grammar as its end-of-sequence, so a row ends (``finish_reason: stop``) as soon as its text is complete.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor

from tunelab.errors import TunelabError

# Bounds on one grammar's compilation (llguidance's defaults are 500k symbols and 1M lexer fuel): a schema
# that needs more is refused at compile time, in a few ms, instead of occupying the decoding thread.
MAX_GRAMMAR_SIZE = 100_000
INITIAL_LEXER_FUEL = 300_000
# JSON as compact as json.dumps' default, with no free whitespace: a model cannot pad the output with
# endless blanks, and tool calls look as they do in training (tunelab.data.tool_render.format_call).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError:
        raise TunelabError("structured outputs and forced tool calls need llguidance: pip install 'tunelab[serve]'") from None
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """A grammar in llguidance's serialized form (what ``grammar_from_json_schema``/``grammar_from_lark`` return)."""

    text: str


def json_schema_grammar(schema: dict) -> Grammar:
    """The grammar of JSON documents valid under ``schema`` (compact separators, no free whitespace)."""
    return Grammar(_llguidance().LLMatcher.grammar_from_json_schema(schema, overrides=dict(JSON_OPTIONS)))


def lark_grammar(lark: str) -> Grammar:
    """A Lark grammar (``%json {schema}`` embeds a JSON schema; give it ``"x-guidance": JSON_OPTIONS``)."""
    return Grammar(_llguidance().LLMatcher.grammar_from_lark(lark))


def json_rule(schema: dict) -> str:
    """A Lark right-hand side matching JSON valid under ``schema``, formatted as :data:`JSON_OPTIONS` says."""
    return "%json " + json.dumps({**schema, "x-guidance": dict(JSON_OPTIONS)}, ensure_ascii=False)


_tokenizers: dict[tuple, tuple[Any, Any]] = {}
_lock = threading.Lock()


def ll_tokenizer(tokenizer, stop_ids: Sequence[int]):
    """llguidance's view of ``tokenizer`` with ``stop_ids`` as end of sequence, built once per tokenizer (~0.5 s
    for a 49k vocabulary)."""
    key = (id(tokenizer), tuple(stop_ids))
    with _lock:
        cached = _tokenizers.get(key)
        if cached is None or cached[0] is not tokenizer:  # an id reused by another tokenizer
            llg = _llguidance()
            if not getattr(tokenizer, "is_fast", False):
                raise TunelabError("constrained decoding needs a fast (Rust) tokenizer; this model's is a slow one")
            cached = (tokenizer, llg.hf.from_tokenizer(tokenizer, eos_token=list(stop_ids)))
            _tokenizers[key] = cached
    return cached[1]


def _limits():
    return _llguidance().LLParserLimits(max_grammar_size=MAX_GRAMMAR_SIZE, initial_lexer_fuel=INITIAL_LEXER_FUEL)


def grammar_problem(grammar: Grammar, tokenizer, stop_ids: Sequence[int]) -> str | None:
    """Why ``grammar`` cannot constrain ``tokenizer``'s output (a bad schema, an unsupported keyword, over the
    limits), or None."""
    message = _llguidance().LLMatcher.validate_grammar(grammar.text, ll_tokenizer(tokenizer, stop_ids), limits=_limits())
    return message or None


class RowMatcher:
    """The grammar state of one generated row: masks its logits, then follows the token chosen."""

    def __init__(self, grammar: Grammar, tokenizer, stop_ids: Sequence[int]):
        llg = _llguidance()
        self.tokenizer = ll_tokenizer(tokenizer, stop_ids)
        self.matcher = llg.LLMatcher(self.tokenizer, grammar.text, log_level=0, limits=_limits())
        if self.matcher.is_error():
            raise TunelabError(f"the grammar does not compile: {self.matcher.get_error()}")
        self.stop_ids = list(stop_ids)
        self.words = torch.zeros((self.tokenizer.vocab_size + 31) // 32, dtype=torch.int32)

    def mask_(self, logits: torch.Tensor) -> None:
        """Set to -inf, in place, the logits (V,) of every token the grammar does not allow next."""
        if self.matcher.is_error():  # cannot happen with masked tokens; end the row rather than emit garbage
            allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
            allowed[[i for i in self.stop_ids if i < logits.shape[-1]]] = True
        else:
            self.matcher.unsafe_compute_mask_ptr(self.words.data_ptr(), self.words.numel() * 4)
            bits = np.unpackbits(self.words.numpy().view(np.uint8), bitorder="little")  # (words * 32,), token i = bit i
            allowed = torch.from_numpy(bits.view(np.bool_))
            allowed = allowed[: logits.shape[-1]]
            if allowed.shape[0] < logits.shape[-1]:  # model rows past the tokenizer's vocabulary: never allowed
                allowed = torch.cat([allowed, torch.zeros(logits.shape[-1] - allowed.shape[0], dtype=torch.bool)])
        logits.masked_fill_(~allowed.to(logits.device), float("-inf"))

    def consume(self, token: int) -> None:
        if not self.matcher.is_stopped() and not self.matcher.is_error():
            self.matcher.consume_token(token)


class GrammarMask(LogitsProcessor):
    """``model.generate``'s logits processor masking each row with its own matcher (None: that row is free).

    Passed before temperature and top-p (see :func:`tunelab.generation.generate.generate_kwargs`).
    """

    def __init__(self, matchers: Sequence[RowMatcher | None], prompt_width: int):
        self.matchers, self.prompt_width = list(matchers), prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids.shape[1] - self.prompt_width
        for row, matcher in enumerate(self.matchers):
            if matcher is None:
                continue
            if generated > 0:
                matcher.consume(int(input_ids[row, -1]))
            matcher.mask_(scores[row])
        return scores


def row_matchers(tokenizer, constraints: Sequence[Grammar | None] | None, stop_ids: Sequence[int]) -> list[RowMatcher | None] | None:
    """A fresh matcher per constrained row, or None when no row is constrained."""
    if not constraints or all(c is None for c in constraints):
        return None
    return [None if c is None else RowMatcher(c, tokenizer, stop_ids) for c in constraints]
