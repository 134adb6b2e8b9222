"""What ``tunelab data synth`` and a pipeline's ``synth`` stage take, checked once for both, and the prompt files."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunelab.errors import TunelabError

PLACEHOLDERS = {"question": ("{context}",), "answer": ("{context}", "{question}")}


class SynthSettings(BaseModel):
    """Every knob of the synthesis, with the defaults that work for the embedded 135M generator."""

    model_config = ConfigDict(extra="forbid")

    chunk_tokens: int = Field(96, ge=8, description="tokens per chunk (the generator's tokenizer)")
    overlap: int = Field(16, ge=0, description="tokens consecutive chunks share")
    related: int = Field(0, ge=0, description="related chunks (BM25) added to each chunk's context")
    context_tokens: int = Field(320, ge=8, description="most tokens of a context with its related chunks")
    question_rounds: int = Field(1, ge=1, description="times each context is asked for questions: the first greedy (with "
                                 "temperature 0), the others sampled at round_temperature with their own seeds")
    round_temperature: float = Field(0.8, gt=0.0, description="sampling temperature of the question rounds after the first")
    questions_tokens: int = Field(80, ge=8, description="longest reply to the question prompt")
    answer_tokens: int = Field(64, ge=8, description="longest answer; answers cut off here are left out")
    temperature: float = Field(0.0, ge=0.0, description="0 decodes greedily (reproducible, resumable to the same result)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    min_grounding: float = Field(0.5, ge=0.0, le=1.0, description="least share of a question's content words in its context")
    min_support: float = Field(0.6, ge=0.0, le=1.0, description="least share of an answer's content words in its context")
    near_duplicate: float = Field(0.7, gt=0.0, le=1.0, description="questions this similar (MinHash Jaccard) to a kept one go")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="share of the kept pairs held out as the eval split")
    with_context: bool = Field(False, description="put the context in the user turn (open-book data) instead of the question alone")
    prompts: str | None = Field(None, description="folder with question.txt / answer.txt replacing the shipped prompts")
    batch_size: int = Field(16, ge=1, description="prompts per generation batch (local generator)")

    @model_validator(mode="after")
    def _overlap_below_half(self):
        if self.overlap >= self.chunk_tokens // 2:
            raise ValueError(f"overlap {self.overlap} must be below half of chunk_tokens {self.chunk_tokens}")
        return self


@dataclass(frozen=True)
class PromptFile:
    """A step's prompt: its text, where it came from, and its version (12 hex digits of its SHA-256)."""

    step: str
    text: str
    source: str

    @property
    def version(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]

    def render(self, **values: str) -> str:
        text = self.text
        for name, value in values.items():
            text = text.replace("{" + name + "}", value)
        return text.strip()

    def describe(self) -> dict:
        return {"file": self.source, "version": self.version}


def load_prompts(folder: str | None) -> dict[str, PromptFile]:
    """The question and answer prompts: ``folder``'s files where present, else the shipped ones.

    Raises:
        TunelabError: The folder is missing, or a prompt lacks one of its placeholders.
    """
    shipped = resources.files("tunelab.synth") / "prompts"
    if folder is not None and not Path(folder).is_dir():
        raise TunelabError(f"--prompts {folder}: not a folder; give a folder holding question.txt and/or answer.txt")
    prompts = {}
    for step, needed in PLACEHOLDERS.items():
        own = Path(folder) / f"{step}.txt" if folder is not None else None
        if own is not None and own.is_file():
            text, source = own.read_text(encoding="utf-8"), str(own)
        else:
            text, source = (shipped / f"{step}.txt").read_text(encoding="utf-8"), f"tunelab:synth/prompts/{step}.txt"
        missing = [p for p in needed if p not in text]
        if missing:
            raise TunelabError(f"{source}: the {step} prompt lacks {', '.join(missing)}; the placeholder is replaced by the "
                               + ("context" if step == "question" else "context and the question"))
        prompts[step] = PromptFile(step, text, source)
    return prompts
