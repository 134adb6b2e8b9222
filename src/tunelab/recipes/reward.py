"""Reward model recipe (``recipe: reward``): learn to score answers from chosen/rejected pairs.

The causal LM trains with any tuning method, plus a scalar head on the last token's hidden state
(``training.reward_model``); the loss is ``-log σ(r_chosen − r_rejected − margin)``. Data are the
preference pairs of ``recipe: dpo`` (``data.train``; held out: ``data.eval``, else every k-th pair).
``eval.json`` holds the held-out pairwise accuracy before (an untrained head: chance) and after training.
The artifact is the method's (``adapter/`` or ``model/``) with ``reward_head.safetensors`` beside it;
``tunelab.rewards.load(RUN_DIR)`` scores completions from Python (a GRPO reward, a data filter).
"""

from __future__ import annotations

from rich.console import Console

from tunelab.config.schema import RunConfig
from tunelab.evaluation.run import write_report
from tunelab.recipes import TrainResult
from tunelab.recipes.options import RewardOptions
from tunelab.stages.model import check_method_fits, load_base
from tunelab.stages.preference import read_pairs, tokenize_pairs
from tunelab.stages.run import finish_run
from tunelab.stages.setup import load_prepared_tokenizer
from tunelab.stages.training import (already_finished, begin_training_run, check_environment, make_trainable, nothing_to_do,
                                     optimize, save_trained, training_loop)
from tunelab.training.pair_loop import run_pair_loss
from tunelab.training.reward_model import HEAD_FILE, new_head, reward_metrics, reward_objective


def main(config: RunConfig, *, resume: bool = False, force: bool = False, console: Console | None = None) -> TrainResult:
    """Train a reward model on preference pairs as configured."""
    console = console or Console(stderr=True)
    options: RewardOptions = config.recipe
    # 1. Validate the pairs, the run directory, the settings and the method before anything loads.
    pairs = read_pairs(config, options.holdout)
    env = check_environment(config, resume=resume, force=force)
    model_path, tokenizer, added = load_prepared_tokenizer(config)
    check_method_fits(config, added)

    # 2. The LM made trainable, a fresh scalar head trained with it (and checkpointed with it).
    data = tokenize_pairs(config, tokenizer, pairs)
    start = load_base(config, model_path, tokenizer, added, env.accelerator.device)
    tuned = make_trainable(config, env, start, tokenizer, added, [p.chosen for p in data.train], console)
    head = new_head(tuned.model, config.train.seed).to(env.accelerator.device)
    tuned.params.update({f"reward_head.{name}": p for name, p in head.named_parameters()})
    held_out = _held_out(config, head, data.eval, tokenizer, env)
    before = held_out(tuned.model)
    state = optimize(config, env, tuned, len(data.train), console)
    if already_finished(env, state):
        return nothing_to_do(env, tuned.method.artifact, state.start_step, console)
    manifest = begin_training_run(config, env, tuned, state, model_path, console,
                                  f"{len(data.train)} train / {len(data.eval)} held-out pairs, scalar head on the last token")

    # 3. Train, then save the method's artifact with the head beside it.
    with training_loop(env, state, manifest):
        reporter = run_pair_loss(state, data.train, loss_fn=reward_objective(head), held_out=held_out,
                                 pad_id=tokenizer.pad_token_id, console=console)
    trained = save_trained(config, env, state, tuned, tokenizer, manifest, reporter, console, extra_modules={HEAD_FILE: head})

    # 4. Held-out pairwise accuracy, untrained head against trained.
    after = held_out(trained.model)
    write_report({"reward": {"before": before, "after": after, "pairs": len(data.eval)}}, env.run_dir / "eval.json")
    if before and after:
        console.print(f"Held-out pairs ({len(data.eval)}): pairwise accuracy {before['eval_accuracy']:.1%} → "
                      f"{after['eval_accuracy']:.1%}, margin {before['eval_margin']:.3f} → {after['eval_margin']:.3f}")
    finish_run(env.run_dir, manifest, **trained.costs, final_train_loss=reporter.last_loss,
               final_eval=reporter.last_eval, eval_summary={"reward_accuracy": (after or {}).get("eval_accuracy")})
    return trained.result(env)


def _held_out(config: RunConfig, head, held, tokenizer, env):
    def metrics(model):
        if not held:
            return None
        return reward_metrics(model, head, held, batch_size=config.train.batch_size, pad_id=tokenizer.pad_token_id,
                              device=env.accelerator.device, autocast=env.accelerator.autocast)
    return metrics


def inspect(config: RunConfig, example: int, console: Console) -> None:
    """``tunelab data inspect``: the same pair view as ``recipe: dpo``."""
    from tunelab.recipes.dpo import inspect as inspect_pairs

    inspect_pairs(config, example, console)
