"""Fill-in-the-middle (FIM) documents for continued pre-training on code (``data.format: fim``).

The transformation of Bavarian et al. 2022, *Efficient Training of Language Models to Fill in the
Middle*: with probability ``rate`` a document is cut at two character positions drawn uniformly at random
into (prefix, middle, suffix) and rearranged so that the middle comes last and is predicted from both
sides; the rest stay plain left-to-right text. Two orders:

* **PSM** ``<fim_prefix>prefix<fim_suffix>suffix<fim_middle>middle``;
* **SPM** ``<fim_prefix><fim_suffix>suffix<fim_middle>prefix middle`` (the paper's SPM variant that
  StarCoder trains with: the prefix runs straight into the middle, so a completion continues the prefix).

``spm_rate`` of the FIM documents take SPM, the others PSM. The draws depend only on (seed, piece index),
so a resumed run sees the same pieces. The transformation is the paper's *context-level* FIM: each
document is first cut into pieces that fit one training block (``data.max_length`` less room for the
three FIM tokens and eos), and each piece is rearranged on its own, so a prefix, its suffix and its
middle always sit in the same block (document-level FIM on a file longer than a block would put the
middle blocks away from its prefix). The end-of-document token follows the middle.

Tokens: the tokenizer's own when it has a FIM set (StarCoder's ``<fim_prefix>``... or Qwen's
``<|fim_prefix|>``...); else the StarCoder spellings are added as special tokens, and, as for added chat
markers, training learns their embedding rows. Hand-written: no library does this for an arbitrary
tokenizer (StarCoder's and Megatron's versions are training-script internals over token ids).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from tunelab.data.text import TextDocument

SPELLINGS = (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"), ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))


@dataclass(frozen=True)
class FimTokens:
    prefix: str
    suffix: str
    middle: str


def fim_tokens(tokenizer) -> tuple[FimTokens, list[str]]:
    """The tokenizer's FIM tokens, adding StarCoder's when it has none; returns them and the tokens added."""
    vocab = tokenizer.get_vocab()
    for spelling in SPELLINGS:
        if all(token in vocab for token in spelling):
            return FimTokens(*spelling), []
    added = [t for t in SPELLINGS[0] if t not in vocab]
    tokenizer.add_tokens(added, special_tokens=True)  # special: never split, whatever the text around them
    return FimTokens(*SPELLINGS[0]), added


def to_fim(text: str, tokens: FimTokens, rng: np.random.Generator, rate: float, spm_rate: float) -> tuple[str, str]:
    """``text`` rearranged for FIM with probability ``rate`` (else unchanged); returns it and its order
    (``psm``, ``spm`` or ``plain``)."""
    if rng.random() >= rate or len(text) < 2:
        return text, "plain"
    a, b = sorted(int(x) for x in rng.integers(0, len(text) + 1, size=2))
    prefix, middle, suffix = text[:a], text[a:b], text[b:]
    if rng.random() < spm_rate:
        return f"{tokens.prefix}{tokens.suffix}{suffix}{tokens.middle}{prefix}{middle}", "spm"
    return f"{tokens.prefix}{prefix}{tokens.suffix}{suffix}{tokens.middle}{middle}", "psm"


RESERVED = 8  # tokens of a block kept for the three FIM tokens, eos, and re-tokenisation at the cut points


def pieces(documents: list[TextDocument], tokenizer, max_tokens: int) -> list[TextDocument]:
    """Each document cut at token boundaries into pieces of at most ``max_tokens - RESERVED`` tokens (``source#pieceN``)."""
    size = max(max_tokens - RESERVED, 8)
    out = []
    for document in documents:
        offsets = tokenizer(document.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        starts = [a for a, _ in offsets[::size]] or [0]
        for n, (a, b) in enumerate(zip(starts, starts[1:] + [len(document.text)])):
            if document.text[a:b].strip():
                out.append(TextDocument(document.text[a:b], f"{document.source}#piece{n}"))
    return out


def fim_documents(documents: list[TextDocument], tokens: FimTokens, *, rate: float, spm_rate: float,
                  seed: int) -> list[TextDocument]:
    """Every document (a piece, from :func:`pieces`) through :func:`to_fim`, each with its own generator seeded
    by (seed, index)."""
    out = []
    for index, document in enumerate(documents):
        text, _ = to_fim(document.text, tokens, np.random.default_rng([seed, index]), rate, spm_rate)
        out.append(replace(document, text=text))
    return out
