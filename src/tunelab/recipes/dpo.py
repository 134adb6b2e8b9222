"""Preference tuning recipe (``recipe: dpo``): DPO and its relatives on {context, chosen, rejected} pairs.

``recipe.loss`` picks a registered preference loss (``training.preference``: sigmoid = DPO/cDPO, ipo,
hinge, orpo, simpo; each docstring gives its paper and formula); any tuning method trains. The reference
is the model training starts from unless ``recipe.reference`` names another run or model, and costs no
second copy of the weights where the method can be switched off (``stages.preference``). Typical use
starts from an SFT run: ``init_from: runs/sft`` (continue its adapter) or with ``init_from_merge: true``
(a fresh adapter on the merged SFT model, which is then also the reference).

Reported before and after training: on held-out pairs (``data.eval``, else every k-th pair) the loss, the
implicit rewards, their margin and the preference accuracy, and the policy's own log-probability
accuracy; on ``recipe.task_eval`` (prompt → reference examples) the task metric; and the forgetting probe.
"""

from __future__ import annotations

from rich.console import Console

from tunelab.config.schema import RunConfig
from tunelab.data import load_examples
from tunelab.errors import TunelabError
from tunelab.evaluation.run import LoadedModel
from tunelab.evaluation.summary import eval_summary
from tunelab.recipes import TrainResult
from tunelab.recipes.options import DpoOptions
from tunelab.stages.evaluation import evaluate_after, evaluate_before, save_before
from tunelab.stages.model import check_method_fits, load_base
from tunelab.stages.preference import choose_references, read_pairs, reference_path, tokenize_pairs
from tunelab.stages.run import finish_run, hashed_inputs
from tunelab.stages.setup import Examples, load_prepared_tokenizer
from tunelab.stages.training import (already_finished, begin_training_run, check_environment, make_trainable, nothing_to_do,
                                     optimize, save_trained, training_loop)
from tunelab.training.pair_loop import pair_metrics, pair_objective, run_pair_loss
from tunelab.training.preference import get_preference_loss


def main(config: RunConfig, *, resume: bool = False, force: bool = False, console: Console | None = None) -> TrainResult:
    """Tune on preference pairs as configured."""
    console = console or Console(stderr=True)
    options: DpoOptions = config.recipe
    spec, loss_options = get_preference_loss(options.loss), options.loss_options()
    # 1. Validate: every pair and task example, the reference, the run directory, the settings, the method.
    pairs = read_pairs(config, options.holdout)
    task = Examples([], load_examples([options.task_eval], system_prompt=config.data.system_prompt) if options.task_eval else [])
    reference = reference_path(config, options.reference)
    env = check_environment(config, resume=resume, force=force,
                            data_files=hashed_inputs(config) + ([options.task_eval] if options.task_eval else []), task=task)
    model_path, tokenizer, added = load_prepared_tokenizer(config)
    check_method_fits(config, added)

    # 2. Tokenized pairs; the start model's task score, probe and pair metrics; the reference; the optimizer.
    data = tokenize_pairs(config, tokenizer, pairs)
    start = load_base(config, model_path, tokenizer, added, env.accelerator.device)
    before = evaluate_before(config, LoadedModel(start, tokenizer, "untuned"), task, env.run_dir, console)
    tuned = make_trainable(config, env, start, tokenizer, added, [p.chosen for p in data.train], console)
    references, described = choose_references(config, spec, tuned, data, reference=reference,
                                              precompute=options.precompute_reference, env=env, tokenizer=tokenizer, console=console)
    metrics = _metrics(config, spec, loss_options, references[1], data.eval, tokenizer, env)
    if "preference" not in before:
        before["preference"] = metrics(tuned.model)
    state = optimize(config, env, tuned, len(data.train), console)
    if already_finished(env, state):
        return nothing_to_do(env, tuned.method.artifact, state.start_step, console)
    what = (f"{len(data.train)} train / {len(data.eval)} held-out pairs, loss {spec.name}, reference: {described}")
    manifest = begin_training_run(config, env, tuned, state, model_path, console, what)
    save_before(env.run_dir, before)

    # 3. Train on the pairs, then save the artifact.
    with training_loop(env, state, manifest):
        reporter = run_pair_loss(state, data.train, loss_fn=pair_objective(references[0], spec, loss_options), held_out=metrics,
                                 pad_id=tokenizer.pad_token_id, console=console)
    trained = save_trained(config, env, state, tuned, tokenizer, manifest, reporter, console)

    # 4. Pair metrics, task score and probe: the start model against the tuned one.
    after = metrics(trained.model)
    report = evaluate_after(config, LoadedModel(trained.model, tokenizer, "tuned"), task, before, env.run_dir, console,
                            extra={"preference": {"before": before["preference"], "after": after, "pairs": len(data.eval)}})
    _print_pairs(console, before["preference"], after, len(data.eval))
    finish_run(env.run_dir, manifest, **trained.costs, final_train_loss=reporter.last_loss,
               final_eval=reporter.last_eval, eval_summary={**eval_summary(report), "preference_after": after})
    return trained.result(env)


def _metrics(config: RunConfig, spec, loss_options, reference, held, tokenizer, env):
    """``metrics(model)``: the held-out pair metrics (None when no pair is held out)."""
    def metrics(model):
        if not held:
            return None
        return pair_metrics(model, held, reference, spec, loss_options, batch_size=config.train.batch_size,
                            pad_id=tokenizer.pad_token_id, device=env.accelerator.device, autocast=env.accelerator.autocast)
    return metrics


def _print_pairs(console: Console, before: dict | None, after: dict | None, n: int) -> None:
    if before and after:
        console.print(f"Held-out pairs ({n}): preference accuracy {before['eval_accuracy']:.1%} → {after['eval_accuracy']:.1%}, "
                      f"margin {before['eval_margin']:.3f} → {after['eval_margin']:.3f}, chosen more likely than rejected "
                      f"{before['eval_logp_accuracy']:.1%} → {after['eval_logp_accuracy']:.1%}")


def inspect(config: RunConfig, example: int, console: Console) -> None:
    """``tunelab data inspect``: pair statistics and one pair with each side's trained tokens marked."""
    from tunelab.data.inspect import print_rendered
    from tunelab.data.preferences import render_pair

    options: DpoOptions = config.recipe
    pairs = read_pairs(config, options.holdout)
    _, tokenizer, _ = load_prepared_tokenizer(config)
    data = tokenize_pairs(config, tokenizer, pairs)
    if not 0 <= example < len(pairs.train):
        raise TunelabError(f"--example {example}: the training set has {len(pairs.train)} pairs")
    s = data.stats
    console.print(f"{s.pairs} pairs ({len(data.eval)} held out), {s.tokens:,} tokens over both sides, trained tokens: chosen "
                  f"{s.trained_tokens['chosen']:,}, rejected {s.trained_tokens['rejected']:,}; longest side {s.max_len}, "
                  f"mean {s.mean_len:.1f}; {s.truncated} truncated, {len(s.dropped)} dropped", soft_wrap=True)
    for side, runs in render_pair(pairs.train[example], tokenizer).items():
        print_rendered(runs, console, title=f"{side} ({pairs.train[example].source})")
