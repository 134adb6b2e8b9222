"""GRPO recipe (``recipe: grpo``): reinforcement learning from reward functions, no labelled answers needed.

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath): for each prompt the policy samples
``num_generations`` completions, their rewards are normalised within the group (the advantage), and the
clipped policy-ratio objective of PPO raises the likelihood of the better ones. Loss aggregation
``dapo`` (default; Yu et al. 2025: token-level over the batch, ``epsilon_high`` for the clip-higher
trick), ``dr_grpo`` (Liu et al. 2025: a constant normaliser) or ``grpo`` (per-sequence means). ``beta``
> 0 adds a KL term to the reference, the policy with its method switched off (default 0, as TRL).

Data: ``data.train`` prompt records (``tunelab.data.prompts``: instruction data's final answer becomes the
field ``reference``); ``data.eval`` instruction examples scored with ``eval.metric`` before and after, with
the forgetting probe, as every recipe. Rewards: ``recipe.rewards: [{fn, weight, ...options}]``, each
checked on a dry sample before training (``tunelab.rewards.functions``); a ``module:function`` reward runs in a
worker process, each call stopped after ``recipe.reward_timeout`` seconds (``tunelab.rewards.guard``).
``init_from`` an SFT run is the normal start.
"""

from __future__ import annotations

from rich.console import Console

from tunelab.config.schema import RunConfig
from tunelab.data import load_examples
from tunelab.data.prompts import load_prompts
from tunelab.errors import TunelabError
from tunelab.evaluation.run import LoadedModel
from tunelab.evaluation.summary import eval_summary
from tunelab.recipes import TrainResult
from tunelab.recipes.options import GrpoOptions
from tunelab.rewards.environment import EnvironmentClient
from tunelab.rewards.functions import RewardSet
from tunelab.stages.evaluation import evaluate_after, evaluate_before, save_before
from tunelab.stages.model import check_method_fits, continues_parent, load_base
from tunelab.stages.run import finish_run
from tunelab.stages.setup import Examples, load_prepared_tokenizer
from tunelab.stages.training import (already_finished, begin_training_run, check_environment, make_trainable, nothing_to_do,
                                     optimize, save_trained, training_loop)
from tunelab.training.distributed import is_main
from tunelab.training.episodes import EpisodeSampler
from tunelab.training.grpo_loop import GrpoSettings, run_grpo


def main(config: RunConfig, *, resume: bool = False, force: bool = False, console: Console | None = None) -> TrainResult:
    """Train by GRPO as configured."""
    console = console or Console(stderr=True)
    options: GrpoOptions = config.recipe
    if not options.rewards and not options.environment:
        raise TunelabError("recipe.rewards is empty: give at least one reward function, e.g. rewards: [{fn: sql_exec, db: shop.sqlite}]")
    # 1. Validate the prompts, the task examples, the reward functions, the environment, the run directory and the method.
    prompts = load_prompts(config.data.train_files(), system_prompt=config.data.system_prompt)
    task = Examples([], load_examples(config.data.eval_files(), system_prompt=config.data.system_prompt) if config.data.eval_files() else [])
    rewards = RewardSet(options.rewards, timeout=options.reward_timeout) if options.rewards else None
    if rewards is not None:
        rewards.dry_run(["a dry-run completion"] * 2, [list(p.messages) for p in prompts[:2]], [p.fields for p in prompts[:2]])
    episodes = _episodes(options, config, prompts)
    env = check_environment(config, resume=resume, force=force, task=task)
    model_path, tokenizer, added = load_prepared_tokenizer(config)
    check_method_fits(config, added)
    if options.beta > 0 and continues_parent(config):
        raise TunelabError("recipe.beta > 0 needs the reference to be the start model with the method switched off; with "
                           "init_from continuing an adapter that is the base instead. Set init_from_merge: true, or beta: 0")

    # 2. The start model's task score and probe; the method and optimizer.
    start = load_base(config, model_path, tokenizer, added, env.accelerator.device)
    before = evaluate_before(config, LoadedModel(start, tokenizer, "untuned"), task, env.run_dir, console)
    held_out = _held_out_episodes(config, episodes, rewards)
    if held_out and "episodes" not in before:  # (a resumed run reads it back from eval_before.json)
        before["episodes"] = held_out(start, tokenizer, "untuned", console)
    tuned = make_trainable(config, env, start, tokenizer, added, _planned_rows(prompts, tokenizer, options), console)
    state = optimize(config, env, tuned, len(prompts), console)
    if already_finished(env, state):
        return nothing_to_do(env, tuned.method.artifact, state.start_step, console)
    manifest = begin_training_run(config, env, tuned, state, model_path, console, _what(options, prompts, rewards, episodes))
    save_before(env.run_dir, before)

    # 3. Sample, score, update; then save the artifact.
    disabled = tuned.method.disabled if options.beta > 0 else None  # the KL term's reference: the method switched off
    with training_loop(env, state, manifest):
        reporter = run_grpo(state, [list(p.messages) for p in prompts], [p.fields for p in prompts], rewards, tokenizer=tokenizer,
                            settings=_settings(options, config), disabled=disabled, console=console, episodes=episodes)
    trained = save_trained(config, env, state, tuned, tokenizer, manifest, reporter, console)

    # 4. Task score and probe: the start model against the tuned one.
    agent = {"before": before["episodes"], "after": held_out(trained.model, tokenizer, "tuned", console)} if held_out else None
    report = evaluate_after(config, LoadedModel(trained.model, tokenizer, "tuned"), task, before, env.run_dir, console,
                            extra={"episodes": agent} if agent else None)
    if agent:
        console.print(f"Held-out episodes ({agent['after']['episodes']} prompts, greedy, with the environment): mean reward "
                      f"{agent['before']['reward']:.3f} untuned → {agent['after']['reward']:.3f} tuned; tool calls per "
                      f"episode {agent['before']['tool_calls']:.2f} → {agent['after']['tool_calls']:.2f}")
    finish_run(env.run_dir, manifest, **trained.costs, final_train_loss=reporter.last_loss, final_eval=reporter.last_eval,
               eval_summary={**eval_summary(report), **({"episodes_reward_after": agent["after"]["reward"]} if agent else {})})
    return trained.result(env)


def _what(options: GrpoOptions, prompts, rewards: RewardSet | None, episodes: EpisodeSampler | None) -> str:
    """The run's one-line description: prompts, samples or episodes, rewards, loss."""
    names = [*(rewards.names if rewards else []), *(["environment"] if episodes and episodes.env.has_reward else [])]
    return (f"{len(prompts)} prompts x {options.num_generations} {'episodes' if episodes else 'samples'}, rewards "
            f"{', '.join(names)}, loss {options.loss_type}")


def _episodes(options: GrpoOptions, config: RunConfig, prompts) -> EpisodeSampler | None:
    """The episode sampler of agentic GRPO (``recipe.environment``), its environment tried on the first prompt."""
    if options.environment is None:
        return None
    env = EnvironmentClient(options.environment, options.environment_options, timeout=options.environment_timeout)
    if not options.rewards and not env.has_reward:
        raise TunelabError(f"environment {options.environment!r} has no reward(episode) method and recipe.rewards is empty: "
                           "give reward functions to score the final answers, or add a reward method")
    sampler = EpisodeSampler(env, max_turns=options.max_turns, seed=config.train.seed)
    sampler.dry_run([list(p.messages) for p in prompts[:1]], [p.fields for p in prompts[:1]])
    return sampler


def _held_out_episodes(config: RunConfig, episodes: EpisodeSampler | None, rewards: RewardSet | None):
    """``(model, tokenizer, label, console) -> dict``: greedy episodes on the held-out prompts (``data.eval``) scored
    by the recipe's rewards and the environment, the agent's own accuracy; None without an environment or eval data."""
    if episodes is None or not config.data.eval_files() or not is_main():
        return None
    held = load_prompts(config.data.eval_files(), system_prompt=config.data.system_prompt)

    def run(model, tokenizer, label: str, console: Console) -> dict:
        console.print(f"Playing {len(held)} held-out episodes with the {label} model (greedy) ...")
        return episodes.evaluate(model, tokenizer, [list(p.messages) for p in held], [p.fields for p in held], rewards,
                                 max_new_tokens=config.recipe.max_completion_length, batch_size=config.eval.batch_size)
    return run


def _planned_rows(prompts, tokenizer, options: GrpoOptions) -> list:
    """What the memory plan sizes micro-batches by: each prompt's group of rows at the longest completion."""
    from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
    from tunelab.generation import render_prompt

    rows = []
    # an episode: up to max_turns completions, each followed by tool output (guessed as long as a completion)
    length = options.max_completion_length * (2 * options.max_turns if options.environment else 1)
    for p in prompts:
        ids = render_prompt(tokenizer, list(p.messages))
        row = TokenizedExample(ids + [0] * length, [IGNORE_INDEX] * len(ids) + [0] * length, p.source)
        rows += [row] * options.num_generations
    return rows


def _settings(options: GrpoOptions, config: RunConfig) -> GrpoSettings:
    return GrpoSettings(num_generations=options.num_generations, temperature=options.temperature, top_p=options.top_p,
                        max_completion_length=options.max_completion_length, scale_rewards=options.scale_rewards,
                        epsilon=options.epsilon, epsilon_high=options.epsilon_high, aggregation=options.loss_type,
                        num_iterations=options.num_iterations, beta=options.beta, seed=config.train.seed,
                        generation_batch_size=options.generation_batch_size, samples_every=options.samples_every)
