"""``tunelab data generate`` and ``tunelab data preferences``: training data made by a model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from tunelab.clikit import console, friendly, metric_options
from tunelab.errors import TunelabError


def register(data_app: typer.Typer) -> None:
    """Add ``generate`` and ``preferences`` to ``tunelab data``."""
    data_app.command("generate")(friendly(generate_command))
    data_app.command("preferences")(friendly(preferences_command))


@contextlib.contextmanager
def _progress(description: str, total: int) -> Iterator[Any]:
    """A rich progress bar with ETA over prompts; yields the ``on_batch(done, total)`` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(description, total=total)
        yield lambda done, _total: bar.update(task, completed=done)


def generate_command(
    model: Annotated[str, typer.Option("--model", help="the teacher: alias, HF dir, .gguf, hub id, or a tunelab run directory")],
    prompts: Annotated[Path, typer.Option("--prompts", help="data file of prompts: messages ending with a user turn, or "
                                                            "prompt records (any answer in it is ignored)")],
    out: Annotated[Path, typer.Option("--out", help="JSONL of SFT records (messages + the teacher's answer, meta: provenance)")],
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="longest answer"),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 decodes greedily; above 0 samples"),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="nucleus sampling (with --temperature > 0)"),
    seed: int = typer.Option(0, "--seed", help="seed for sampling (same seed and batch size, same answers)"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="prompts per generation batch"),
    keep_truncated: bool = typer.Option(False, "--keep-truncated", help="also write answers cut off at --max-new-tokens"),
) -> None:
    """Write a teacher model's answers to PROMPTS as SFT data (sequence-level distillation).

    Each record holds the prompt and the teacher's answer as `messages` and, in `meta`, the teacher (spec, resolved path; for a run its base, artifact and hashes), the decoding settings and the prompt's file:line. The file is written only once every answer is in.
    """
    from tunelab.datagen.generate import check_output, generate_sft, load_teacher, write_jsonl
    from tunelab.datagen.prompts import read_prompts
    from tunelab.generation import SamplingSettings
    from tunelab.runs import open_run

    check_output(out, [prompts])
    settings = SamplingSettings(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    run = open_run(model)
    # A run's teacher reads prompts as its training data was read (its system prompt, its raw template).
    found = read_prompts(str(prompts), **(run.data_settings() if run is not None else {}))
    with console.status(f"loading {model} ..."):
        teacher = load_teacher(model)
    with _progress("answering", len(found)) as on_batch:
        records, summary = generate_sft(teacher, found, settings, batch_size=batch_size, keep_truncated=keep_truncated,
                                        on_batch=on_batch)
    if not records:
        raise TunelabError(f"{prompts}: none of the {summary.n_prompts} answers is usable ({len(summary.empty)} empty, "
                           f"{len(summary.truncated)} cut off at --max-new-tokens {max_new_tokens}); raise --max-new-tokens "
                           "or pass --keep-truncated. Nothing was written")
    write_jsonl(out, records)
    cut = len(summary.truncated)
    note = "" if not cut else f"; {cut} answer(s) hit --max-new-tokens " + ("(kept)" if keep_truncated else "(left out; --keep-truncated keeps them)")
    empty = f"; {len(summary.empty)} empty answer(s) left out" if summary.empty else ""
    console.print(f"Wrote {summary.n_written} of {summary.n_prompts} answers to [bold]{escape(str(out))}[/] in {summary.seconds:.0f} s{note}{empty}.",
                  soft_wrap=True)


def preferences_command(
    model: Annotated[Path, typer.Option("--model", help="a tunelab run directory (e.g. an SFT run)")],
    data: Annotated[Path, typer.Option("--data", help="TRAINING examples whose final assistant message is the reference; "
                                                      "never the evaluation split")],
    out: Annotated[Path, typer.Option("--out", help="JSONL of preference pairs (messages, chosen, rejected, meta)")],
    metric: Optional[str] = typer.Option(None, "--metric", help="exact_match, contains, regex, accuracy, json_valid, json_schema, "
                                                                 "sql_exec, ... or module:function (default: the run's eval.metric)"),
    db: Optional[Path] = typer.Option(None, "--db", help="SQLite database for sql_exec (default: the run's eval.db)"),
    option: Optional[list[str]] = typer.Option(None, "--option", help="metric option KEY=VALUE (repeatable)"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="longest answer (default: the run's eval.max_new_tokens)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="prompts per batch (default: the run's eval.batch_size)"),
    threshold: float = typer.Option(1.0, "--threshold", help="an answer scoring below this is wrong"),
) -> None:
    """Preference pairs from a run's own mistakes on its TRAINING data: reference as chosen, wrong answer as rejected.

    Never use the evaluation split for this (the run's data.eval, or a copy of it, is refused): the pairs would teach the held-out answers and its score would no longer measure anything. Answers are greedy, as `tunelab eval` makes them; an answer scoring below --threshold is wrong. A summary (examples, wrong, pairs, skipped) goes to OUT's .summary.json.
    """
    from tunelab.data import load_examples
    from tunelab.datagen.generate import check_output, to_device
    from tunelab.datagen.mistakes import refuse_eval_split
    from tunelab.evaluation.run import load_for_eval
    from tunelab.runs import open_run

    run = open_run(model)
    if run is None:
        raise TunelabError(f"--model {model}: not a tunelab run directory (no manifest.json); pass the folder `tunelab train` wrote")
    refuse_eval_split(run, data)
    check_output(out, [data])
    eval_section = run.config.get("eval") or {}
    metric, options = _metric_and_options(eval_section, metric, db, option or [])
    examples = load_examples([str(data)], **run.data_settings())
    with console.status(f"loading {model} ..."):
        loaded = load_for_eval(str(model))
        to_device(loaded.model)
    _write_pairs(run, loaded, examples, data, metric, options, out, threshold=threshold,
                 max_new_tokens=max_new_tokens or int(eval_section.get("max_new_tokens", 128)),
                 batch_size=batch_size or int(eval_section.get("batch_size", 16)))


def _metric_and_options(eval_section: dict, metric: str | None, db: Path | None, items: list[str]) -> tuple[str, dict]:
    """The metric and its options: the run's own (eval.metric and its options) unless the command line says otherwise."""

    from tunelab.config.schema import EvalConfig

    recorded = EvalConfig(**eval_section)
    metric = metric or recorded.metric
    return metric, metric_options(items, db, recorded.metric_options() if metric == recorded.metric else {})


def _write_pairs(run, loaded, examples, data: Path, metric: str, options: dict, out: Path, **settings: Any) -> None:
    """Find the mistakes, write the pairs and the summary (each atomically), and print the summary."""
    import json
    from dataclasses import asdict

    from tunelab.atomic import write_text_atomic
    from tunelab.datagen.generate import write_jsonl
    from tunelab.datagen.mistakes import find_mistakes

    with _progress("answering", len(examples)) as on_batch:
        pairs, summary = find_mistakes(loaded, examples, metric, options, model=str(run.path.resolve()), on_batch=on_batch, **settings)
    if pairs:
        write_jsonl(out, pairs)
    report = {"model": str(run.path.resolve()), "data": str(data.resolve()),
              "metric": metric, "options": {k: str(v) for k, v in options.items()}, **settings, "out": str(out) if pairs else None,
              **asdict(summary)}
    summary_path = out.with_name(out.stem + ".summary.json")
    write_text_atomic(summary_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    stale = f"; the older {out} is left as it was" if not pairs and out.exists() else ""
    written = f"{summary.n_pairs} pairs to [bold]{out}[/]" if pairs else f"no pairs (nothing written to the pairs file{stale})"
    skipped = f" ({len(summary.skipped)} wrong answers could not be pairs: see the summary)" if summary.skipped else ""
    console.print(f"{metric} {summary.score:.3f} on {summary.n_examples} examples: {summary.n_wrong} wrong; wrote {written}"
                  f"{skipped} in {summary.seconds:.0f} s. Summary: {summary_path}", soft_wrap=True)
