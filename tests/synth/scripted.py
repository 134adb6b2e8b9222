"""A scripted generator for the synth tests: it behaves like a small model, mistakes included."""

from __future__ import annotations

import re

DOCS = {"returns.txt": "A customer may return any unused item within thirty days of delivery. Refunds reach the card within "
                       "five business days.",
        "shipping.md": "Standard shipping costs four pounds fifty. Orders over sixty pounds ship free from Tilbury.",
        "stores.html": "<p>The Norwich store hosts a repair cafe on the first Saturday of each month.</p>"}


class Scripted:
    """Asks about each sentence of the context and answers with the sentence; adds the mistakes a small model makes."""

    provenance = {"kind": "scripted"}

    def __init__(self):
        self.calls = 0

    def complete(self, conversations, settings):
        self.calls += len(conversations)
        return [self._reply(c[0]["content"], settings) for c in conversations]

    def _reply(self, prompt: str, settings):
        if "Question:" not in prompt:
            context = prompt.split("Text: ")[-1].split("\nQuestions:")[0]
            sentences = [s for s in re.split(r"(?<=\.)\s+", context) if s]
            questions = [f"What does the text say about {' '.join(s.split()[1:5])}?" for s in sentences]
            return "\n".join([f"{n}. {q}" for n, q in enumerate(questions, 1)] + [questions[0],  # a repeat
                             "How much does it cost to replace a lost book?",  # not about this text
                             "Tell me more.", "What is the difference between a tier and a tier?"]), "stop"
        context = prompt.split("Text: ")[1].split("\n\nQuestion:")[0]
        question = prompt.split("Question: ")[1].split("\n")[0]
        key = question.removeprefix("What does the text say about ").rstrip("?")
        sentence = next(s for s in re.split(r"(?<=\.)\s+", context) if key in s)
        if "Standard" in sentence:
            return "I'm sorry, I cannot answer that.", "stop"
        if "Norwich" in sentence:
            return "The moon is made of green cheese and purple volcanoes.", "stop"
        return sentence, ("length" if "Refunds" in sentence and settings.max_new_tokens < 30 else "stop")
