"""Which generated question-answer pairs are kept: format, length, grounding in the context, duplicates.

Every check returns a score or a reason, recorded in the provenance of kept pairs and in the rejected
list, so a user can see why a pair went and move a threshold.

* **format**: a question is one line ending in ``?`` that is not an instruction echo ("Here are the
  questions", "Questions:"); an answer is not empty, not a refusal, not a copy of the question; neither
  keeps repeating its own words (a small model's "the difference between a tier and a tier").
* **length**: question and answer word counts within bounds.
* **grounding**: the share of a question's content words (lowercase words of three letters or more, less
  a short stop list) found in its context, so questions about something the text never mentions go.
* **answerability** (*support*): the share of the answer's content words found in the context. A small
  generator invents; an answer whose words are not in the text is not supported by it.
* **duplicates**: exact (normalised text) and near duplicates of earlier kept questions: MinHash over word
  3-shingles (Broder 1997), banded LSH for candidates, the estimated Jaccard similarity against
  ``near_duplicate``. Hand-written (numpy, ~30 lines) because the library that has it, datasketch, pulls
  scipy for this one function.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

_WORD = re.compile(r"[a-z0-9][a-z0-9'-]*")
STOP = frozenset("""the and for are but not you your with this that from have has had was were will would can could
should may might must does did doing done what which who whom whose when where why how its it's they them their there
here then than into onto over under about after before also any all each every some such only own same other more
most very just being been is are our ours out off per via use used using text question answer questions answers""".split())
_REFUSAL = re.compile(r"^(i'm sorry|i am sorry|sorry|i cannot|i can't|as an ai|i don't know|i do not know|the text does not)", re.I)
_ECHO = re.compile(r"^(here (are|is)|questions?:|answers?:|sure|text:)", re.I)


def normalize(text: str) -> str:
    """Lowercase words joined by single spaces (what exact-duplicate detection compares)."""
    return " ".join(_WORD.findall(text.lower()))


def content_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if len(w) >= 3 and w not in STOP]


def coverage(text: str, context: str) -> float:
    """The share of ``text``'s content words that occur in ``context`` (1.0 when it has none)."""
    words = content_words(text)
    if not words:
        return 1.0
    known = set(content_words(context))
    return sum(w in known for w in words) / len(words)


def repetition(text: str) -> float:
    """Distinct content words over content words (1.0: no word repeats; "a tier and a tier" scores 0.5)."""
    words = content_words(text)
    return len(set(words)) / len(words) if words else 1.0


def question_problem(question: str, min_words: int = 4, max_words: int = 40) -> str | None:
    """Why a question is not usable, or None."""
    words = len(question.split())
    if not question.endswith("?"):
        return "format: not a question"
    if _ECHO.match(question):
        return "format: instruction echo"
    if repetition(question) < 0.8:
        return "format: repeats itself"
    if not min_words <= words <= max_words:
        return f"length: {words} words (keep {min_words}..{max_words})"
    return None


def answer_problem(answer: str, question: str, min_words: int = 2, max_words: int = 120) -> str | None:
    """Why an answer is not usable, or None."""
    words = len(answer.split())
    if not answer:
        return "format: empty answer"
    if _REFUSAL.match(answer):
        return "format: refusal"
    if normalize(answer) == normalize(question):
        return "format: repeats the question"
    if repetition(answer) < 0.6:
        return "format: repeats itself"
    if not min_words <= words <= max_words:
        return f"length: {words} words (keep {min_words}..{max_words})"
    return None


class NearDuplicates:
    """Remembers kept texts; ``check(text)`` says whether it nearly repeats one (estimated Jaccard ≥ threshold)."""

    def __init__(self, threshold: float = 0.7, permutations: int = 64, bands: int = 16, seed: int = 0):
        if permutations % bands:
            raise ValueError("permutations must be a multiple of bands")
        self.threshold, self.bands, self.rows = threshold, bands, permutations // bands
        rng = np.random.default_rng(seed)
        self.prime = np.uint64((1 << 61) - 1)
        self.a = rng.integers(1, 1 << 61, permutations, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 61, permutations, dtype=np.uint64)
        self.exact: set[str] = set()
        self.buckets: dict[tuple, list[int]] = {}
        self.signatures: list[np.ndarray] = []

    def signature(self, text: str) -> np.ndarray:
        words = normalize(text).split()
        shingles = {" ".join(words[i: i + 3]) for i in range(max(len(words) - 2, 1))}
        hashes = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") >> 3 for s in shingles],
                          dtype=np.uint64)  # [S], below 2**61
        with np.errstate(over="ignore"):
            permuted = (hashes[:, None] * self.a[None, :] + self.b[None, :]) % self.prime  # [S, P]
        return permuted.min(axis=0)

    def check(self, text: str) -> tuple[str | None, float]:
        """(a reason when ``text`` duplicates a kept one, else None; the highest similarity found). Kept texts are remembered."""
        key = normalize(text)
        if key in self.exact:
            return "duplicate: exact", 1.0
        signature = self.signature(text)
        bands = [(band, signature[band * self.rows: (band + 1) * self.rows].tobytes()) for band in range(self.bands)]
        candidates = {i for band in bands for i in self.buckets.get(band, [])}
        best = max((float(np.mean(self.signatures[i] == signature)) for i in candidates), default=0.0)
        if best >= self.threshold:
            return f"duplicate: near ({best:.2f})", best
        self.exact.add(key)
        for band in bands:
            self.buckets.setdefault(band, []).append(len(self.signatures))
        self.signatures.append(signature)
        return None, best
