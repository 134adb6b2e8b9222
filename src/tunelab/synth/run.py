"""``synthesize``: documents → chunks → contexts → questions → answers → filters → train (and eval) records.

Every reply of the generator goes through the resume cache (:mod:`tunelab.synth.cache`), so a crash or a
kill loses at most one batch and a re-run with other filter thresholds generates nothing. The outputs
(records, provenance sidecar, rejected pairs, summary) are written atomically once every pair is decided,
and the records are read back through tunelab's data validation before the function returns.

Outputs beside ``out`` (``train.jsonl``): ``train.provenance.jsonl`` (one line per record, the same order:
documents and character spans, generator, prompt versions, filter scores), ``train.rejected.jsonl`` (each
dropped pair and why) and ``train.synth.json`` (counts per reason, settings, seconds).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.atomic import write_text_atomic
from tunelab.errors import TunelabError
from tunelab.generation import SamplingSettings
from tunelab.synth import filters
from tunelab.synth.cache import ReplyCache, request_key
from tunelab.synth.chunks import Context, chunk_document, group_contexts
from tunelab.synth.documents import read_documents
from tunelab.synth.generators import Generator
from tunelab.synth.settings import PromptFile, SynthSettings, load_prompts

OnProgress = Callable[[str, int, int], None]
"""Called with (step, done, total) as replies arrive: step is ``questions`` or ``answers``."""
_NUMBERING = re.compile(r"^\s*(?:\d+\s*[.):-]|[-*•]|q\d*\s*[:.)-]|question\s*\d*\s*[:.)-])\s*", re.I)


@dataclass
class Pair:
    context: Context
    question: str
    answer: str = ""
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class Outputs:
    """Where the results go: ``train`` (required) and the optional ``eval`` split."""

    train: Path
    eval: Path | None = None

    def sidecar(self, suffix: str) -> Path:
        return self.train.with_name(self.train.stem + suffix)


def parse_questions(reply: str) -> list[str]:
    """The questions of a reply: one per line, numbering and bullets removed, repeats within the reply dropped."""
    seen, questions = set(), []
    for line in reply.splitlines():
        text = _NUMBERING.sub("", line).strip().strip('"').strip()
        if text and filters.normalize(text) not in seen:
            seen.add(filters.normalize(text))
            questions.append(text)
    return questions


class _Asker:
    """Sends one step's conversations to the generator through the cache."""

    def __init__(self, generator: Generator, cache: ReplyCache, settings: SynthSettings, on_progress: OnProgress | None):
        self.generator, self.cache, self.settings, self.on_progress = generator, cache, settings, on_progress

    def ask(self, step: str, prompt: PromptFile, texts: list[str], max_tokens: int, stop: tuple[str, ...], *,
            temperature: float | None = None, seed: int | None = None) -> list[tuple[str, str]]:
        s = self.settings
        temperature = s.temperature if temperature is None else temperature
        sampling = SamplingSettings(temperature=temperature, top_p=s.top_p, max_new_tokens=max_tokens,
                                    seed=s.seed if seed is None else seed, stop=stop)
        identity = {"generator": self.generator.provenance, "prompt": prompt.version, "sampling": repr(sampling)}
        conversations = [[{"role": "user", "content": t}] for t in texts]
        keys = [request_key(identity, c) for c in conversations]
        report = (lambda done: self.on_progress(step, done, len(keys))) if self.on_progress else None
        return self.cache.answer(keys, conversations, lambda batch: self.generator.complete(batch, sampling), s.batch_size, report)


def _questions(asker: _Asker, prompt: PromptFile, contexts: list[Context], rejected: list[dict]) -> list[Pair]:
    s = asker.settings
    texts = [prompt.render(context=c.text) for c in contexts]
    replies = [asker.ask("questions" if r == 0 else f"round {r + 1}", prompt, texts, s.questions_tokens, ("\n\n",),
                         temperature=None if r == 0 else s.round_temperature, seed=s.seed + r)
               for r in range(s.question_rounds)]
    pairs, seen = [], set()
    for context, reply in [(c, rs[i][0]) for rs in replies for i, c in enumerate(contexts)]:
        for question in parse_questions(reply):
            if (context.id, filters.normalize(question)) in seen:
                continue  # asked again in a later round: not a new candidate
            seen.add((context.id, filters.normalize(question)))
            grounding = round(filters.coverage(question, context.text), 3)
            problem = filters.question_problem(question)
            if problem is None and grounding < s.min_grounding:
                problem = f"grounding: {grounding:.2f} of its words in the context (< {s.min_grounding})"
            if problem:
                rejected.append({"context": context.id, "question": question, "reason": problem, "grounding": grounding})
            else:
                pairs.append(Pair(context, question, scores={"grounding": grounding}))
    return pairs


def _answers(asker: _Asker, prompt: PromptFile, pairs: list[Pair], rejected: list[dict]) -> list[Pair]:
    s = asker.settings
    texts = [prompt.render(context=p.context.text, question=p.question) for p in pairs]
    replies = asker.ask("answers", prompt, texts, s.answer_tokens, ())
    duplicates = filters.NearDuplicates(s.near_duplicate, seed=s.seed)
    kept = []
    for pair, (reply, finish) in zip(pairs, replies):
        pair.answer = reply.strip()
        pair.scores["support"] = round(filters.coverage(pair.answer, pair.context.text), 3)
        problem = filters.answer_problem(pair.answer, pair.question)
        if problem is None and finish == "length":
            problem = f"length: cut off at answer_tokens {s.answer_tokens}"
        if problem is None and pair.scores["support"] < s.min_support:
            problem = f"answerability: {pair.scores['support']:.2f} of its words in the context (< {s.min_support})"
        if problem is None:
            problem, pair.scores["near_duplicate"] = duplicates.check(pair.question)
        if problem:
            rejected.append({"context": pair.context.id, "question": pair.question, "answer": pair.answer, "reason": problem,
                             **pair.scores})
        else:
            kept.append(pair)
    return kept


def _in_eval(pair: Pair, settings: SynthSettings) -> bool:
    digest = hashlib.sha256(f"{settings.seed}:{filters.normalize(pair.question)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < settings.eval_fraction


def _record(pair: Pair, settings: SynthSettings) -> dict:
    user = f"{pair.context.text}\n\n{pair.question}" if settings.with_context else pair.question
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": pair.answer}]}


def _provenance(pair: Pair, line: int, split: str, generator: Generator, prompts: dict[str, PromptFile]) -> dict:
    return {"split": split, "line": line, "context": pair.context.id, "spans": pair.context.spans(),
            "generator": generator.provenance, "prompts": {k: p.describe() for k, p in prompts.items()}, "scores": pair.scores}


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _write(outputs: Outputs, kept: list[Pair], rejected: list[dict], summary: dict, generator, prompts, settings) -> None:
    splits: dict[str, list[Pair]] = {"train": [], "eval": []}
    for pair in kept:
        splits["eval" if outputs.eval is not None and _in_eval(pair, settings) else "train"].append(pair)
    if not splits["train"]:
        raise TunelabError(f"none of the {len(kept)} kept pairs is left for training; lower eval_fraction")
    provenance = [_provenance(p, n, split, generator, prompts) for split in splits for n, p in enumerate(splits[split], 1)]
    write_text_atomic(outputs.sidecar(".provenance.jsonl"), _jsonl(provenance))
    write_text_atomic(outputs.sidecar(".rejected.jsonl"), _jsonl(rejected))
    summary.update(train=len(splits["train"]), eval=len(splits["eval"]))
    write_text_atomic(outputs.sidecar(".synth.json"), json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if outputs.eval is not None:
        write_text_atomic(outputs.eval, _jsonl([_record(p, settings) for p in splits["eval"]]))
    write_text_atomic(outputs.train, _jsonl([_record(p, settings) for p in splits["train"]]))


def synthesize(docs: str | Path, generator: Generator, tokenizer, settings: SynthSettings, outputs: Outputs, *,
               cache: str | Path | None = None, on_progress: OnProgress | None = None) -> dict[str, Any]:
    """Make question-answer records from ``docs`` with ``generator``; returns the summary (also written beside the output).

    Raises:
        TunelabError: no document, no pair survives the filters, or the generator fails.
    """
    started = time.time()
    prompts = load_prompts(settings.prompts)
    documents = read_documents(docs)
    chunks = [c for d in documents for c in chunk_document(d, tokenizer, settings.chunk_tokens, settings.overlap)]
    contexts = group_contexts(chunks, settings.related, settings.context_tokens)
    replies = ReplyCache(cache or outputs.sidecar(".cache.jsonl"))
    asker = _Asker(generator, replies, settings, on_progress)
    rejected: list[dict] = []
    kept = _answers(asker, prompts["answer"], _questions(asker, prompts["question"], contexts, rejected), rejected)
    reasons = Counter(r["reason"].split(":")[0] for r in rejected)
    summary = {"documents": len(documents), "chunks": len(chunks), "contexts": len(contexts), "kept": len(kept),
               "rejected": dict(sorted(reasons.items())), "replies_from_cache": replies.reused,
               "generator": generator.provenance, "settings": settings.model_dump(), "seconds": round(time.time() - started, 1)}
    if not kept:
        write_text_atomic(outputs.sidecar(".rejected.jsonl"), _jsonl(rejected))
        raise TunelabError(f"{docs}: every one of the {len(rejected)} generated pairs was filtered out ({dict(reasons)}); see "
                           f"why in {outputs.sidecar('.rejected.jsonl')}, loosen min_grounding/min_support, or use a stronger "
                           "--generator")
    _write(outputs, kept, rejected, summary, generator, prompts, settings)
    from tunelab.data import load_examples

    load_examples([str(outputs.train)] + ([str(outputs.eval)] if outputs.eval is not None and summary["eval"] else []))
    return summary
