"""Multi-turn episodes for agentic GRPO: ``G`` episodes per prompt, in which the model calls the tools of an
environment (:mod:`tunelab.rewards.environment`), reads their results and goes on, until it answers without a
call or reaches ``max_turns``.

Each turn is one batched ``generate`` over the episodes still running (finished ones drop out, so one that
stopped early or waits on nothing stalls no other). Calls are read with :func:`tunelab.data.tool_parse.parse_tool_calls`
(the parser evaluation uses), results are appended as ``tool`` messages, and conversations render with
:func:`tunelab.data.tool_render.render_chat` with the environment's tools (the model's template when it renders
tools, else tunelab's fallback).

An episode's training row is built token by token as it is played, and the model generates from exactly those
ids: the rendered opening (labelled -100), each turn's generated tokens (labelled: the only tokens the loss
sees), and after each call the rendered tool turn and next generation prompt (labelled -100: tool output is
never trained on). The tool turn's text is the difference between the conversation rendered before and after
the results, so the template must render a conversation as a growing prefix (it is refused otherwise). A turn
cut at ``max_completion_length`` gets the end-of-turn token appended, unlabelled.

Randomness: each turn's sampling seed is a function of (run seed, step, turn), each environment's ``reset``
gets a seed of (run seed, step, prompt, episode), so a resumed run plays the same episodes.
Hand-written: TRL's and verl's agent loops live inside their trainers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunelab.data.tool_parse import parse_tool_calls
from tunelab.data.tool_render import render_chat
from tunelab.errors import TunelabError
from tunelab.generation import Completion, SamplingSettings, end_of_turn_ids, generate
from tunelab.training.rollouts import Rollouts


def episode_seed(seed: int, step: int, prompt: int, episode: int) -> int:
    """The seed an environment's ``reset`` gets: distinct per (step, prompt, episode), the same on a resume."""
    return (((seed * 1_000_003 + step) * 1_000_033 + prompt) * 1_009 + episode) % (2**31 - 1)


@dataclass
class Episode:
    """One episode as it is played: its conversation and its training row."""

    key: str
    index: int  # which prompt it answers
    where: str  # for messages: "example 3 (prompt ...), episode 1"
    record: dict
    messages: list[dict]
    ids: list[int]
    labels: list[int]
    prompt_tokens: int
    model_tokens: list[int] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    finish_reason: str = "stop"
    final: str = ""
    done: bool = False


@dataclass
class EpisodeRollouts(Rollouts):
    """Rollouts whose rows are whole episodes; ``completions[i].text`` is episode i's final answer."""

    episodes: list[Episode] = field(default_factory=list)
    env_rewards: torch.Tensor | None = None  # (N,) the environment's reward, when it has one

    def stats(self) -> dict[str, float]:
        n = max(1, len(self.episodes))
        out = {"episode/turns": sum(e.turns for e in self.episodes) / n,
               "episode/tool_calls": sum(e.tool_calls for e in self.episodes) / n,
               "episode/tool_errors": sum(e.tool_errors for e in self.episodes) / n}
        if self.env_rewards is not None:
            out["episode/env_reward"] = float(self.env_rewards.mean())
        return out


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tool_turn_text(tokenizer, before: list[dict], after: list[dict], tools: list[dict], stop_text: str, stopped: bool) -> str:
    """The text that follows the model's last token: the end of its turn, the tool results and the next
    generation prompt (``after`` is ``before`` plus the tool messages; ``before`` ends with the model's turn)."""
    prev = render_chat(tokenizer, before, tools)
    full = render_chat(tokenizer, after, tools, add_generation_prompt=True)
    if not full.startswith(prev):
        raise TunelabError("agentic GRPO: the chat template renders a conversation differently once tool results are "
                           "added (not as a growing prefix), so the episode's tokens cannot be kept exact; use a "
                           "template that keeps earlier turns as they were")
    cut = prev.rfind(stop_text) if stop_text else -1
    glue = prev[cut + len(stop_text):] if cut >= 0 else ""
    return ("" if stopped else stop_text) + glue + full[len(prev):]


class EpisodeSampler:
    """Plays episodes against an environment client (:class:`tunelab.rewards.environment.EnvironmentClient`)."""

    def __init__(self, env, *, max_turns: int, seed: int):
        if max_turns < 1:
            raise TunelabError(f"recipe.max_turns={max_turns}: set it to 1 or more")
        self.env, self.max_turns, self.seed = env, max_turns, seed

    def dry_run(self, prompts: list, fields: list[dict]) -> None:
        """Reset and close one episode of the first prompt before training: a broken environment stops here."""
        episode = self._start(prompts, fields, 0, 0, step=-1, tokenizer=None)
        self.env.close_episode(episode.key, episode.where)

    def _start(self, prompts: list, fields: list[dict], index: int, g: int, *, step: int, tokenizer) -> Episode:
        where = f"for example {index} (prompt {str(prompts[index][-1].get('content'))[:60]!r}), episode {g}"
        record = {"messages": list(prompts[index]), **fields[index]}
        key = f"{step}:{index}:{g}"
        opening = self.env.reset(key, record, episode_seed(self.seed, step, index, g), where) or list(prompts[index])
        ids = _encode(tokenizer, render_chat(tokenizer, opening, self.env.tools, add_generation_prompt=True)) if tokenizer else []
        return Episode(key, index, where, record, list(opening), ids, [IGNORE_INDEX] * len(ids), len(ids))

    @torch.no_grad()
    def sample(self, model, tokenizer, prompts: list, fields: list[dict], indices: list[int], *, group_size: int,
               settings: SamplingSettings, batch_size: int, step: int) -> EpisodeRollouts:
        """``group_size`` episodes for each of ``prompts[i]``, ``i`` in ``indices``, played turn by turn."""
        episodes = [self._start(prompts, fields, i, g, step=step, tokenizer=tokenizer) for i in indices for g in range(group_size)]
        eot = end_of_turn_ids(tokenizer)
        for turn in range(self.max_turns):
            running = [e for e in episodes if not e.done]
            if not running:
                break
            turn_settings = replace(settings, seed=None if settings.seed is None else settings.seed * 31 + turn)
            completions = generate(model, tokenizer, [e.ids for e in running], turn_settings, batch_size=batch_size)
            for episode, completion in zip(running, completions):
                self._advance(tokenizer, episode, completion, turn, eot)
        return self._finish(episodes, indices, group_size)

    def _advance(self, tokenizer, e: Episode, c: Completion, turn: int, eot: list[int]) -> None:
        tokens = list(c.token_ids)
        e.ids += tokens
        e.labels += tokens
        e.model_tokens += tokens
        e.turns += 1
        e.finish_reason = c.finish_reason
        parsed = parse_tool_calls(c.text)
        e.tool_errors += len(parsed.problems)
        if not parsed.calls or turn == self.max_turns - 1:
            e.messages.append({"role": "assistant", "content": c.text})
            e.final, e.done = (parsed.text if parsed.calls else c.text), True
            return
        calls = [{"id": f"call_{turn}_{k}", **call} for k, call in enumerate(parsed.calls)]
        assistant = {"role": "assistant", "content": parsed.text, "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
            for call in calls]}
        results, errors = self.env.step(e.key, calls, e.where)
        e.tool_calls += len(calls)
        e.tool_errors += errors
        stopped = c.finish_reason == "stop" and bool(tokens)
        stop_text = tokenizer.decode([tokens[-1] if stopped else eot[0]]) if (tokens or eot) else ""
        before = [*e.messages, assistant]
        delta = _encode(tokenizer, tool_turn_text(tokenizer, before, [*before, *results], self.env.tools, stop_text, stopped))
        e.ids += delta
        e.labels += [IGNORE_INDEX] * len(delta)
        e.messages = [*before, *results]

    def _finish(self, episodes: list[Episode], indices: list[int], group_size: int) -> EpisodeRollouts:
        rewards = []
        for e in episodes:
            if self.env.has_reward:
                rewards.append(self.env.reward(e.key, {"messages": e.messages, "turns": e.turns, "tool_errors": e.tool_errors,
                                                       "record": e.record}, e.where))
            self.env.close_episode(e.key, e.where)
        completions = [Completion(e.model_tokens, e.final, e.finish_reason, e.prompt_tokens) for e in episodes]
        rows = [TokenizedExample(e.ids, e.labels, f"prompt {e.index} episode {n % group_size}") for n, e in enumerate(episodes)]
        env_rewards = torch.tensor(rewards, dtype=torch.float32) if self.env.has_reward else None
        return EpisodeRollouts([e.index for e in episodes], completions, rows, group_size, episodes, env_rewards)

    def evaluate(self, model, tokenizer, prompts: list, fields: list[dict], rewards, *, max_new_tokens: int,
                 batch_size: int) -> dict[str, float]:
        """One greedy episode per held-out prompt, scored as training scores them: the mean total reward (for
        an execution-match reward, the held-out accuracy of the agent) with the turns and tool calls it took."""
        settings = SamplingSettings(temperature=0.0, max_new_tokens=max_new_tokens)
        was_training = model.training
        model.eval()
        try:
            rollouts = self.sample(model, tokenizer, prompts, fields, list(range(len(prompts))), group_size=1,
                                   settings=settings, batch_size=batch_size, step=-2)
        finally:
            model.train(was_training)
        _, total, _ = self.score(rewards, rollouts, prompts, fields)
        return {"episodes": len(prompts), "reward": round(float(total.mean()), 4), **{
            k.split("/")[1]: round(v, 3) for k, v in rollouts.stats().items() if k != "episode/env_reward"}}

    def score(self, rewards, rollouts: EpisodeRollouts, prompts: list, fields: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """``(per_function (N, F), total (N,), names)``: the recipe's reward functions over the final answers
        (scored against the original prompts) plus the environment's own reward (weight 1), when there is one."""
        parts, totals, names = [], [], []
        if rewards is not None:
            per_fn, total = rewards.score(rollouts.texts, prompts, fields)
            parts, totals, names = [per_fn], [total], list(rewards.names)
        if rollouts.env_rewards is not None:
            parts.append(rollouts.env_rewards[:, None])
            totals.append(rollouts.env_rewards)
            names.append("environment")
        return torch.cat(parts, dim=1), torch.stack(totals).sum(0), names
