"""Documents cut into token windows with overlap, and chunks grouped into the contexts questions are asked about.

Chunking counts tokens with the generator's tokenizer (a fast tokenizer's character offsets map tokens back
to the text), and ends a chunk at the last sentence end in its second half when there is one, so a chunk
seldom stops mid-sentence; the next chunk starts ``overlap`` tokens before the previous one ended (at the
first sentence start inside that overlap when there is one, so a chunk cut at a sentence end is followed
by the next sentence whole). Each chunk keeps its character span in the
document, which the provenance records.

Grouping: a context is one chunk (its *anchor*) plus up to ``related`` chunks most related to it, ranked
with BM25 (as the RAG baseline ranks passages), never one that overlaps the anchor, within a token budget.
Hand-written because it is a few lines over the tokenizer's offsets; splitter libraries count characters
or need their own tokenizer.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass

from tunelab.errors import TunelabError
from tunelab.synth.documents import Document

_SENTENCE_START = re.compile(r"(?<=[.!?:;])\s+|\n\s*\n")


@dataclass(frozen=True)
class Chunk:
    """``document.text[start:end]`` (stripped), the ``index``-th chunk of the document, ``tokens`` long."""

    document: str
    index: int
    start: int
    end: int
    text: str
    tokens: int


@dataclass(frozen=True)
class Context:
    """The chunks a question is asked about; the first is the anchor."""

    chunks: tuple[Chunk, ...]

    @property
    def text(self) -> str:
        return "\n\n".join(c.text for c in self.chunks)

    @property
    def id(self) -> str:
        return "+".join(f"{c.document}#{c.index}" for c in self.chunks)

    def spans(self) -> list[dict]:
        return [{"document": c.document, "chunk": c.index, "start": c.start, "end": c.end} for c in self.chunks]


def _offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    if not getattr(tokenizer, "is_fast", False):
        raise TunelabError("chunking needs a fast tokenizer (character offsets); pick a model whose tokenizer.json is present")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [(a, b) for a, b in encoded["offset_mapping"] if b > a]


def _containing(token_ends: list[int], char: int) -> int:
    """The index of the token holding character ``char`` (the first whose end is past it)."""
    return bisect_right(token_ends, char)


def _window_end(token_starts: list[int], token_ends: list[int], start: int, size: int, starts: list[int]) -> int:
    """The token index a chunk starting at ``start`` ends before: the last sentence start in its second half if any."""
    end = min(start + size, len(token_starts))
    if end == len(token_starts):
        return end
    low, high = token_starts[start + size // 2], token_starts[end]
    cuts = [c for c in starts if low < c <= high]
    return min(_containing(token_ends, cuts[-1]), end) if cuts else end


def _next_start(token_starts: list[int], token_ends: list[int], end: int, overlap: int, starts: list[int]) -> int:
    """Where the next chunk starts: ``overlap`` tokens back, moved on to the first sentence start in the overlap;
    with none there, at ``end`` when a sentence starts there (whole sentences need no overlap)."""
    first = max(end - overlap, 0)
    inside = [c for c in starts if token_starts[first] <= c <= token_starts[end]]
    return min(_containing(token_ends, inside[0]), end) if inside else first


def chunk_document(document: Document, tokenizer, chunk_tokens: int = 128, overlap: int = 32) -> list[Chunk]:
    """The document in chunks of at most ``chunk_tokens`` tokens, consecutive chunks sharing up to ``overlap``.

    Raises:
        TunelabError: ``overlap`` is not smaller than half of ``chunk_tokens``.
    """
    if chunk_tokens < 8 or not 0 <= overlap < chunk_tokens // 2:
        raise TunelabError(f"chunk size {chunk_tokens} / overlap {overlap}: use a chunk of at least 8 tokens and an overlap "
                           "below half of it")
    text = document.text
    offsets = _offsets(tokenizer, text)
    token_starts, token_ends = [a for a, _ in offsets], [b for _, b in offsets]
    starts = [0] + [m.end() for m in _SENTENCE_START.finditer(text)]
    chunks: list[Chunk] = []
    start = 0
    while start < len(offsets):
        end = _window_end(token_starts, token_ends, start, chunk_tokens, starts)
        a, b = offsets[start][0], offsets[end - 1][1]
        body = text[a:b].strip()
        if body:
            chunks.append(Chunk(document.name, len(chunks), a, b, body, end - start))
        if end >= len(offsets):
            break
        start = max(_next_start(token_starts, token_ends, end, overlap, starts), start + 1)
    return chunks


def group_contexts(chunks: list[Chunk], related: int = 1, max_tokens: int = 320) -> list[Context]:
    """One context per chunk: the chunk, then up to ``related`` most related non-overlapping chunks within
    ``max_tokens`` (the anchor always stays, however long)."""
    from tunelab.evaluation.rag import tokenize, top_k

    corpus = [tokenize(c.text) for c in chunks]
    contexts = []
    for i, anchor in enumerate(chunks):
        chosen = [anchor]
        if related > 0 and len(chunks) > 1:
            overlapping = {j for j, c in enumerate(chunks) if c.document == anchor.document and c.start < anchor.end and anchor.start < c.end}
            for j in top_k(anchor.text, corpus, related, exclude=overlapping):
                if sum(c.tokens for c in chosen) + chunks[j].tokens <= max_tokens:
                    chosen.append(chunks[j])
        contexts.append(Context(tuple(chosen)))
    return contexts
