"""Retrieval-augmented baseline: put the most relevant examples or document passages into each prompt.

A fine-tune has to beat what the untuned model does when the relevant knowledge is simply *shown* to it.
This module builds those prompts; scoring them is ``evaluate_task``'s job, as for the other baselines.

Two modes, both ranked with BM25 (``rank_bm25.BM25Okapi``) over lowercase word tokens, with no model and
no download:

* **train examples** (``documents=None``): for each eval example the ``k`` train examples whose user turns
  are lexically closest to the eval example's user turns become earlier turns of the conversation, like
  ``few_shot_examples`` but chosen per question. The most similar shot comes last, nearest the question.
* **documents** (``documents="folder"``): the folder's ``.txt`` / ``.md`` files (recursively, sorted by
  path, UTF-8) are cut into passages of about ``chunk_chars`` characters on paragraph boundaries; the
  ``k`` best passages are put in front of the question inside the last user message.

The query is only ever the user turns of the conversation being answered, never the reference answer,
and a train example identical to the eval example is never retrieved for it (an eval set that overlaps
the train set would otherwise hand the model its own answer). Ties in score go to the earlier train
example or passage, so the prompts are the same on every run.

Passage packing (greedy, whole paragraphs) is hand-written because the only thing a splitter library
would add is a dependency; the rule is a few lines and is documented on :func:`chunk_text`.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunelab.data import Example
from tunelab.errors import TunelabError

DOCUMENT_SUFFIXES = (".txt", ".md")
CONTEXT_HEADER = "Use the following context to answer the question."
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Passage:
    """A piece of a document: its text and where it came from (``"file.md#3"``: the third passage)."""

    text: str
    source: str


def tokenize(text: str) -> list[str]:
    """BM25 tokens: lowercase runs of word characters (letters, digits, underscore; any script)."""
    return _WORD.findall(text.lower())


def query_text(example: Example) -> str:
    """The text retrieval searches with: the user turns of the conversation to answer, joined.

    The final assistant message is the reference answer and is left out; earlier assistant turns are
    left out too, so a query is the user's words only.
    """
    return "\n".join(m["content"] for m in example.messages[:-1] if m["role"] == "user")


def top_k(query: str, corpus: list[list[str]], k: int, exclude: Collection[int] = ()) -> list[int]:
    """Indices of the ``k`` best BM25 matches of ``query`` in tokenised ``corpus``, best first.

    Ties keep corpus order. Indices in ``exclude`` are never returned. ``corpus`` must be non-empty.
    """
    if all(not doc for doc in corpus):
        scores = np.zeros(len(corpus))  # BM25Okapi divides by the mean length, which would be 0
    else:
        from rank_bm25 import BM25Okapi

        scores = np.asarray(BM25Okapi(corpus).get_scores(tokenize(query)), dtype=np.float64)  # [len(corpus)]
    order = sorted(range(len(corpus)), key=lambda i: (-scores[i], i))
    return [i for i in order if i not in exclude][:k]


def chunk_text(text: str, chunk_chars: int = 800) -> list[str]:
    """Cut ``text`` into passages of at most about ``chunk_chars`` characters on paragraph boundaries.

    Paragraphs are separated by blank lines. Whole paragraphs are packed greedily into a passage while it
    stays within ``chunk_chars``; a paragraph is never split across passages unless it alone is longer
    than ``chunk_chars``, in which case it is cut between words (a single longer word stays whole).
    """
    paragraphs = [re.sub(r"[ \t]+\n", "\n", p).strip() for p in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))]
    pieces: list[str] = []
    for paragraph in filter(None, paragraphs):
        pieces.extend([paragraph] if len(paragraph) <= chunk_chars else _split_words(paragraph, chunk_chars))
    passages: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) > chunk_chars:
            passages.append(current)
            current = ""
        current = f"{current}\n\n{piece}" if current else piece
    if current:
        passages.append(current)
    return passages


def _split_words(paragraph: str, chunk_chars: int) -> list[str]:
    """An over-long paragraph in pieces of at most ``chunk_chars`` characters, cut at whitespace."""
    pieces, current = [], ""
    for word in paragraph.split():
        if current and len(current) + 1 + len(word) > chunk_chars:
            pieces.append(current)
            current = ""
        current = f"{current} {word}" if current else word
    return pieces + [current] if current else pieces


def load_passages(documents: str | Path, chunk_chars: int = 800) -> list[Passage]:
    """Every passage of the ``.txt`` / ``.md`` files under ``documents``, in sorted path order.

    Raises:
        TunelabError: If the folder is missing, holds no such files, a file is not UTF-8, or all are empty.
    """
    if chunk_chars < 1:
        raise TunelabError(f"RAG chunk size must be at least 1 character, got {chunk_chars}")
    root = Path(documents)
    if not root.is_dir():
        raise TunelabError(f"RAG documents folder {str(documents)!r} does not exist or is not a folder; "
                           "point it at a folder of .txt or .md files")
    paths = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES),
                   key=lambda p: p.relative_to(root).as_posix())
    if not paths:
        raise TunelabError(f"RAG documents folder {str(documents)!r} holds no .txt or .md files; add the documents "
                           "the model should look answers up in")
    passages: list[Passage] = []
    for path in paths:
        name = path.relative_to(root).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise TunelabError(f"RAG document {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                               "convert it to UTF-8 or remove it") from None
        except OSError as exc:
            raise TunelabError(f"RAG document {path} cannot be read: {exc}") from None
        passages.extend(Passage(chunk, f"{name}#{n}") for n, chunk in enumerate(chunk_text(text, chunk_chars), 1))
    if not passages:
        raise TunelabError(f"RAG documents folder {str(documents)!r}: every .txt/.md file is empty; add text to retrieve")
    return passages


def context_prompt(question: str, passages: list[str]) -> str:
    """The last user message of a documents-mode prompt: numbered passages, then the original question."""
    numbered = "\n\n".join(f"[{n}] {text}" for n, text in enumerate(passages, 1))
    return f"{CONTEXT_HEADER}\n\n{numbered}\n\nQuestion: {question}"


def rag_examples(examples: list[Example], train: list[Example], k: int, documents: str | None = None,
                 chunk_chars: int = 800) -> list[Example]:
    """Each eval example with the ``k`` most relevant train examples or document passages in its prompt.

    Args:
        examples: The eval examples; each keeps its system message first, its turns, its reference
            answer (the last message) and its ``source``.
        train: Retrieved from when ``documents`` is None (their non-system turns become earlier turns).
        k: How many shots or passages per example (fewer if the pool is smaller).
        documents: A folder of ``.txt``/``.md`` files to retrieve passages from instead of train examples.
        chunk_chars: Passage size in characters for ``documents``.

    Raises:
        TunelabError: On ``k < 1``, no train examples to retrieve from, or a bad documents folder.
    """
    if k < 1:
        raise TunelabError(f"RAG baseline needs k >= 1 retrieved items per question, got k={k}")
    if documents is not None:
        passages = load_passages(documents, chunk_chars)
        corpus = [tokenize(p.text) for p in passages]
        out = []
        for example in examples:
            chosen = [passages[i].text for i in top_k(query_text(example), corpus, k)]
            messages = list(example.messages)
            users = [i for i, m in enumerate(messages[:-1]) if m["role"] == "user"]
            if not users:
                raise TunelabError(f"{example.source}: no user message to add the retrieved context to")
            last_user = users[-1]
            messages[last_user] = {**messages[last_user], "content": context_prompt(messages[last_user]["content"], chosen)}
            out.append(Example(tuple(messages), example.source, example.tools))
        return out
    if not train:
        raise TunelabError("RAG baseline over train examples: data.train has no examples to retrieve from")
    corpus = [tokenize(query_text(t)) for t in train]
    out = []
    for example in examples:
        itself = {i for i, t in enumerate(train) if t.messages == example.messages}
        chosen = top_k(query_text(example), corpus, k, exclude=itself)
        turns = [m for i in reversed(chosen) for m in train[i].messages if m["role"] != "system"]
        messages = list(example.messages)
        system = [messages[0]] if messages[0]["role"] == "system" else []
        out.append(Example(tuple(system + turns + messages[len(system):]), example.source, example.tools))
    return out
