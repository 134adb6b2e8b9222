"""Supervised fine-tuning recipe: validate → set up → evaluate the untuned model → train (resumable) → save →
evaluate the tuned model, read top to bottom.

The objective is the token-summed cross-entropy of the trained (answer) tokens; a step's loss divides by
the trained tokens of the whole step, not a mean of micro-batch means (``training.optim``). The learning
rate is a function of the step and the data order a function of (seed, epoch) (``training.plan``), so a
checkpoint needs only weights, optimizer and RNG states to continue exactly.
"""

from __future__ import annotations

from rich.console import Console

from tunelab.config.schema import RunConfig
from tunelab.errors import TunelabError
from tunelab.data.packing import collator
from tunelab.evaluation.run import LoadedModel
from tunelab.evaluation.summary import eval_summary
from tunelab.recipes import TrainResult
from tunelab.recipes.options import SftOptions
from tunelab.stages.defaults import choose_defaults
from tunelab.stages.evaluation import evaluate_after, evaluate_before, save_before
from tunelab.stages.model import check_method_fits, load_base
from tunelab.stages.replay import replay_kl_loss, resolve_self_replay
from tunelab.stages.run import finish_run
from tunelab.stages.setup import load_prepared_tokenizer, read_examples, tokenize
from tunelab.stages.training import (already_finished, begin_training_run, check_environment, nothing_to_do, prepare_training,
                                     save_trained, training_loop)
from tunelab.training.optim import adamw
from tunelab.training.token_loop import run_token_loss

__all__ = ["SftOptions", "TrainResult", "adamw", "main"]


def main(config: RunConfig, *, resume: bool = False, force: bool = False, console: Console | None = None) -> TrainResult:
    """Run supervised fine-tuning as configured; see the README for the run-directory layout."""
    console = console or Console(stderr=True)
    # 1. Validate everything cheap before anything expensive: records, run directory, settings, method.
    config = resolve_self_replay(config, console)  # data.replay self: the untuned model's answers to general prompts
    examples = read_examples(config)
    model_path, tokenizer, added = load_prepared_tokenizer(config)
    config, examples, chosen = choose_defaults(config, examples, tokenizer, model_path, console)  # what it left unset
    env = check_environment(config, resume=resume, force=force, task=examples)
    check_method_fits(config, added)

    # 2. Tokenized data; the untuned model and its evaluation; the method, optimizer and checkpoint.
    data = tokenize(config, tokenizer, examples, added)
    if config.data.eval_files() and not data.eval:
        console.print("[yellow]warning:[/] every eval example was dropped as too long; no validation loss will be computed")
    base = load_base(config, model_path, tokenizer, added, env.accelerator.device)
    before = evaluate_before(config, LoadedModel(base, tokenizer, "untuned"), examples, env.run_dir, console)
    replay_loss = replay_kl_loss(config, base, env.accelerator.unwrap_model, console)  # data.replay.kl, before the method wraps base
    tuned, state = prepare_training(config, env, base, tokenizer, added, data.train, console)
    if already_finished(env, state):
        return nothing_to_do(env, tuned.method.artifact, state.start_step, console)

    # 3. The run directory describes itself from the start.
    held = f"{len(examples.validation)} held-out validation" if examples.validation else f"{len(data.eval)} eval"
    what = f"{len(data.train)} train / {held} examples, {data.train_stats.trained_tokens:,} trained tokens"
    manifest = begin_training_run(config, env, tuned, state, model_path, console, what, chosen)
    save_before(env.run_dir, before)

    # 4. Train (resumable), then save the artifact with the tokenizer and its chat template.
    make_batch = collator(env.accelerator.unwrap_model(state.model), packing=config.train.packing)
    with training_loop(env, state, manifest):
        reporter = run_token_loss(state, data.train, data.eval, pad_id=tokenizer.pad_token_id, make_batch=make_batch,
                                  console=console, eval_batch_size=config.train.batch_size, source_loss=replay_loss)
    trained = save_trained(config, env, state, tuned, tokenizer, manifest, reporter, console)

    # 5. What it learned and what it forgot: the tuned model against the untuned one.
    report = evaluate_after(config, LoadedModel(trained.model, tokenizer, "tuned"), examples, before, env.run_dir, console)
    finish_run(env.run_dir, manifest, **trained.costs, final_train_loss=reporter.last_loss, final_eval=reporter.last_eval,
               eval_summary=eval_summary(report))
    return trained.result(env)


def inspect(config: RunConfig, example: int, console: Console) -> None:
    """``tunelab data inspect``: validate the data, print statistics, render one example with its trained tokens marked."""
    from tunelab.data import inspect_report
    from tunelab.stages.vision import render_for_inspect

    examples = read_examples(config)
    _, tokenizer, added = load_prepared_tokenizer(config)
    data = tokenize(config, tokenizer, examples, added)
    if not 0 <= example < len(examples.train):
        raise TunelabError(f"--example {example}: the training set has {len(examples.train)} examples")
    chosen = examples.train[example]
    rendered = render_for_inspect(config, chosen, tokenizer)  # image placeholders expanded as the model sees them
    inspect_report(data.train_stats, rendered, console, title=f"train ({chosen.source})")
    if data.eval_stats is not None:
        inspect_report(data.eval_stats, [], console, title="eval")
