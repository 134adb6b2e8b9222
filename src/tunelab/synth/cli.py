"""``tunelab data synth DOCS_DIR --out FILE``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from tunelab.clikit import console, friendly
from tunelab.errors import TunelabError


def register(data_app: typer.Typer) -> None:
    data_app.command("synth")(friendly(synth_command))


@contextlib.contextmanager
def progress_bars() -> Iterator[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        tasks: dict[str, Any] = {}

        def update(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = bar.add_task(step, total=total)
            bar.update(tasks[step], completed=done, total=total)
        yield update


def settings_from(**values: Any):
    """:class:`SynthSettings` from keyword values, every problem at once as a TunelabError naming the option."""
    from pydantic import ValidationError

    from tunelab.synth.settings import SynthSettings

    try:
        return SynthSettings(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as error:
        raise TunelabError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors())) from None


def open_tokenizer(generator, spec: str | None):
    """The tokenizer chunks are counted with: ``spec``'s, else a local generator's, else the embedded model's."""
    if spec is None and getattr(generator, "tokenizer", None) is not None:
        return generator.tokenizer
    from transformers import AutoTokenizer

    from tunelab.models.embedded import DEFAULT_MODEL
    from tunelab.models.load import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(spec or DEFAULT_MODEL))


def synth_command(
    docs: Annotated[Path, typer.Argument(help="folder of .txt, .md, .html and .pdf documents (read recursively)")],
    out: Annotated[Path, typer.Option("--out", help="JSONL of SFT records (question → answer); sidecars beside it")],
    eval_out: Annotated[Optional[Path], typer.Option("--eval-out", help="JSONL of the held-out split (with --eval-fraction)")] = None,
    eval_fraction: Annotated[Optional[float], typer.Option("--eval-fraction", help="share of the kept pairs held out (default 0.1 with --eval-out)")] = None,
    generator: Annotated[str, typer.Option("--generator", help="model alias, HF dir, .gguf, run directory, or an OpenAI-compatible "
                                                                "endpoint http://127.0.0.1:PORT/v1")] = "smollm2-135m-instruct",
    generator_model: Annotated[Optional[str], typer.Option("--generator-model", help="the endpoint's model (default: the first it lists)")] = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="count chunk tokens with this model's tokenizer "
                                                                        "(default: a local generator's, else the embedded model's)")] = None,
    chunk_tokens: Annotated[Optional[int], typer.Option("--chunk-tokens", help="tokens per chunk [default 96]")] = None,
    overlap: Annotated[Optional[int], typer.Option("--overlap", help="tokens consecutive chunks share [default 16]")] = None,
    related: Annotated[Optional[int], typer.Option("--related", help="related chunks added to each context [default 0]")] = None,
    question_rounds: Annotated[Optional[int], typer.Option("--question-rounds", help="times each context is asked for questions "
                                                                                       "(rounds after the first sample) [default 1]")] = None,
    min_support: Annotated[Optional[float], typer.Option("--min-support", help="answerability: least share of the answer's words "
                                                                                 "in its context [default 0.6]")] = None,
    min_grounding: Annotated[Optional[float], typer.Option("--min-grounding", help="least share of the question's words in its "
                                                                                     "context [default 0.5]")] = None,
    with_context: Annotated[bool, typer.Option("--with-context", help="put the context in the user turn (open-book data)")] = False,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="folder with question.txt / answer.txt to use instead of the shipped prompts")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="0 decodes greedily [default 0]")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="sampling seed and eval split seed [default 0]")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="prompts per generation batch [default 16]")] = None,
) -> None:
    """Make question-answer SFT data from a folder of documents with a generator model.

    Documents are chunked by tokens with overlap, each chunk (with --related chunks) becomes a context, the generator writes questions about it and then answers them from it; pairs are filtered for format, length, grounding, answerability and (near-)duplicates. Beside --out: FILE.provenance.jsonl (document, character spans, generator, prompt versions, filter scores per record), FILE.rejected.jsonl (what was dropped and why), FILE.synth.json (summary). Every reply is cached in FILE.cache.jsonl as it arrives: a killed run re-run with the same command resumes where it stopped, and changing only the filters generates nothing.
    """
    from tunelab.synth.generators import open_generator
    from tunelab.synth.run import Outputs, synthesize

    if eval_out is not None and eval_fraction is None:
        eval_fraction = 0.1
    if eval_fraction and eval_out is None:
        raise TunelabError("--eval-fraction needs --eval-out FILE for the held-out split")
    if eval_out is not None and eval_out.resolve() == out.resolve():
        raise TunelabError("--eval-out must differ from --out")
    settings = settings_from(chunk_tokens=chunk_tokens, overlap=overlap, related=related, question_rounds=question_rounds, min_support=min_support,
                             min_grounding=min_grounding, with_context=with_context, prompts=str(prompts) if prompts else None,
                             temperature=temperature, seed=seed, batch_size=batch_size, eval_fraction=eval_fraction)
    with console.status(f"loading {generator} ..."):
        model = open_generator(generator, generator_model, settings.batch_size)
        counter = open_tokenizer(model, tokenizer)
    with progress_bars() as update:
        summary = synthesize(docs, model, counter, settings, Outputs(out, eval_out), on_progress=update)
    split = f" and {summary['eval']} to {eval_out}" if eval_out is not None else ""
    dropped = ", ".join(f"{n} {why}" for why, n in summary["rejected"].items()) or "none"
    console.print(f"Wrote {summary['train']} pairs to [bold]{escape(str(out))}[/]{split} from {summary['documents']} documents "
                  f"({summary['contexts']} contexts) in {summary['seconds']:.0f} s; dropped: {dropped}; "
                  f"{summary['replies_from_cache']} replies from the cache.", soft_wrap=True)
