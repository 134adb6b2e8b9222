"""``synthesize`` end to end with a scripted generator: filters, provenance, the eval split, resume, prompts."""

from __future__ import annotations

import json

import pytest

from tunelab.data import load_examples
from tunelab.errors import TunelabError
from tunelab.models.tiny import build_tiny_tokenizer
from tunelab.synth import filters
from tunelab.synth.cache import ReplyCache
from tunelab.synth.run import Outputs, parse_questions, synthesize
from tunelab.synth.settings import SynthSettings, load_prompts

from .scripted import DOCS, Scripted


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_are_filtered_and_carry_provenance(docs, tmp_path, tokenizer):
    out = Outputs(tmp_path / "out" / "train.jsonl")
    summary = synthesize(docs, Scripted(), tokenizer, SynthSettings(chunk_tokens=200, overlap=0), out)
    records = _lines(out.train)
    answers = [r["messages"][1]["content"] for r in records]
    assert answers == ["A customer may return any unused item within thirty days of delivery.",
                       "Refunds reach the card within five business days.",
                       "Orders over sixty pounds ship free from Tilbury."]
    assert all(r["messages"][0]["role"] == "user" and r["messages"][0]["content"].endswith("?") for r in records)
    reasons = {r["reason"].split(":")[0] for r in _lines(out.sidecar(".rejected.jsonl"))}
    assert reasons == {"grounding", "format", "answerability"}
    assert summary["rejected"] == {"answerability": 1, "format": 7, "grounding": 3}
    provenance = _lines(out.sidecar(".provenance.jsonl"))
    assert [p["line"] for p in provenance] == [1, 2, 3]
    text = (docs / "returns.txt").read_text()
    span = provenance[0]["spans"][0]
    assert span["document"] == "returns.txt" and text[span["start"]: span["end"]].strip() == text
    assert provenance[0]["generator"] == {"kind": "scripted"}
    assert set(provenance[0]["prompts"]) == {"question", "answer"} and len(provenance[0]["prompts"]["answer"]["version"]) == 12
    assert set(provenance[0]["scores"]) == {"grounding", "support", "near_duplicate"}
    assert load_examples([str(out.train)])  # tunelab's own validation reads it
    assert json.loads(out.sidecar(".synth.json").read_text())["train"] == 3


def test_truncated_answers_go_and_the_eval_split_is_stable(docs, tmp_path, tokenizer):
    out = Outputs(tmp_path / "train.jsonl", tmp_path / "eval.jsonl")
    settings = SynthSettings(chunk_tokens=200, overlap=0, answer_tokens=20, eval_fraction=0.5, with_context=True)
    summary = synthesize(docs, Scripted(), tokenizer, settings, out)
    assert summary["rejected"]["length"] == 1
    train, held = _lines(out.train), _lines(out.eval)
    assert len(train) + len(held) == 2 and summary["eval"] == len(held)
    assert all("\n\n" in r["messages"][0]["content"] for r in train + held)  # the context is in the user turn
    again = Outputs(tmp_path / "again.jsonl", tmp_path / "again-eval.jsonl")
    synthesize(docs, Scripted(), tokenizer, settings, again)
    assert _lines(again.eval) == held


def test_a_killed_run_resumes_from_the_cache(docs, tmp_path, tokenizer):
    out = Outputs(tmp_path / "train.jsonl")
    settings = SynthSettings(chunk_tokens=200, overlap=0, batch_size=1)

    class Dies(Scripted):
        def complete(self, conversations, settings):
            if self.calls >= 4:
                raise KeyboardInterrupt
            return super().complete(conversations, settings)

    with pytest.raises(KeyboardInterrupt):
        synthesize(docs, Dies(), tokenizer, settings, out)
    assert not out.train.exists()
    with out.sidecar(".cache.jsonl").open("a") as cache:
        cache.write('{"key": "torn')  # the kill landed mid-line
    fresh = Scripted()
    summary = synthesize(docs, fresh, tokenizer, settings, out)
    assert summary["replies_from_cache"] == 4 and fresh.calls == 4  # of 3 question prompts and 5 answers, 4 were cached
    rerun = Scripted()
    loose = synthesize(docs, rerun, tokenizer, settings.model_copy(update={"min_support": 0.0}), out)
    assert rerun.calls == 0 and loose["kept"] == 4  # new thresholds, no generation: the moon answer is kept now


def test_nothing_kept_is_an_error_that_keeps_the_old_output(docs, tmp_path, tokenizer):
    out = Outputs(tmp_path / "train.jsonl")
    out.train.write_text("old\n")
    with pytest.raises(TunelabError, match="every one of the .* generated pairs was filtered out"):
        synthesize(docs, Scripted(), tokenizer, SynthSettings(chunk_tokens=200, overlap=0, min_grounding=1.0, min_support=1.0,
                                                              near_duplicate=0.01), out)
    assert out.train.read_text() == "old\n"
    assert out.sidecar(".rejected.jsonl").read_text().count("\n") == 14  # why each of the 14 candidates went


def test_prompt_files_can_be_overridden_and_are_checked(tmp_path):
    (tmp_path / "answer.txt").write_text("Context: {context}\nQ: {question}\n")
    prompts = load_prompts(str(tmp_path))
    assert prompts["answer"].source == str(tmp_path / "answer.txt")
    assert prompts["question"].source == "tunelab:synth/prompts/question.txt"
    assert prompts["answer"].render(context="C", question="Q?") == "Context: C\nQ: Q?"
    (tmp_path / "question.txt").write_text("no placeholder")
    with pytest.raises(TunelabError, match=r"question.txt: the question prompt lacks \{context\}"):
        load_prompts(str(tmp_path))
    with pytest.raises(TunelabError, match="not a folder"):
        load_prompts(str(tmp_path / "nope"))


def test_parse_questions_drops_numbering_and_repeats():
    assert parse_questions("1. Where?\n2) Why?\n- Where?\nQ3: How?\n\"When?\"\n") == ["Where?", "Why?", "How?", "When?"]


def test_filters():
    assert filters.coverage("refunds take five days", "Refunds reach you in five days") == pytest.approx(3 / 4)
    assert filters.question_problem("Why?").startswith("length")
    assert filters.question_problem("Here are the questions about it?") == "format: instruction echo"
    assert filters.question_problem("What is the difference between a tier and a tier?") == "format: repeats itself"
    assert filters.question_problem("How long do refunds take to arrive?") is None
    assert filters.answer_problem("As an AI, I cannot say.", "q") == "format: refusal"
    assert filters.answer_problem("How long?", "How long?") == "format: repeats the question"
    seen = filters.NearDuplicates(threshold=0.5)
    assert seen.check("How long do refunds take to reach the card?")[0] is None
    assert seen.check("how long do REFUNDS take to reach the card") == ("duplicate: exact", 1.0)
    reason, similarity = seen.check("How long do refunds take to reach the card of the customer?")
    assert reason.startswith("duplicate: near") and similarity >= 0.5
    assert seen.check("Which store hosts the repair cafe each month?")[0] is None


def test_reply_cache_reuses_answers(tmp_path):
    cache = ReplyCache(tmp_path / "c.jsonl")
    calls = []

    def fetch(batch):
        calls.append(len(batch))
        return [(c[0]["content"].upper(), "stop") for c in batch]

    conversations = [[{"role": "user", "content": t}] for t in "abc"]
    assert cache.answer(["1", "2", "3"], conversations, fetch, batch_size=2) == [("A", "stop"), ("B", "stop"), ("C", "stop")]
    assert calls == [2, 1]
    again = ReplyCache(tmp_path / "c.jsonl")
    assert again.answer(["1", "2", "3"], conversations, fetch, batch_size=2)[2] == ("C", "stop") and calls == [2, 1]
