"""Batched and streamed decoding on top of transformers' ``model.generate`` (KV cache, sampling, peft).

What this adds to ``generate``: prompts rendered with the training chat template, left padding done here
(the tokenizer's ``padding_side`` is never touched, so concurrent callers are safe), end-of-turn stops
read off the template (:func:`tunelab.generation.stops.end_of_turn_ids`), stop strings, seeded sampling
that leaves the global random state alone, and per-sequence results with a finish reason.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence, Union

import torch

from tunelab.data.tool_render import render_chat
from tunelab.errors import TunelabError
from tunelab.generation.constrain import Grammar, GrammarMask, row_matchers
from tunelab.generation.settings import Completion, SamplingSettings
from tunelab.generation.stops import StopMatcher, Stops, StopStrings, as_matcher, end_of_turn_ids, ids_within

Prompt = Union[str, Sequence[dict]]


def render_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of one prompt: token ids as they are, a rendered string as it is, or a conversation through the chat template
    (:func:`tunelab.data.tool_render.render_chat`, so tool calls and results render as in training).

    Raises:
        TunelabError: a conversation is empty or ends with an assistant turn, or the tokenizer has no template.
    """
    if isinstance(prompt, str):
        text = prompt
    elif prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)  # already token ids (multi-turn episodes generate from the exact ids they train on)
    else:
        messages = list(prompt)
        if not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise TunelabError(f"generation prompt {prompt!r}: give a list of {{'role', 'content'}} messages or a rendered string")
        if messages[-1]["role"] == "assistant":
            raise TunelabError("generation prompt: the conversation ends with an assistant turn; end it with the user "
                               "turn to answer (the assistant reply is generated)")
        if not tokenizer.chat_template:
            raise TunelabError("generation prompt: the tokenizer has no chat template; pass rendered strings, or use the "
                               "tokenizer saved with the run (it carries the template used in training)")
        text = render_chat(tokenizer, messages, add_generation_prompt=True)  # as training and evaluation render
    # The rendered text already holds any BOS the template wants; adding special tokens would double it.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pad_id(tokenizer, stop_ids: list[int]) -> int:
    """The id that pads prompts: the tokenizer's pad token, else the first stop token."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if stop_ids:
        return stop_ids[0]
    raise TunelabError("generation: the tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token")


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, longest), padded on the left so every continuation starts together."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def generate_kwargs(settings: SamplingSettings, stop_ids: list[int], pad_id: int) -> dict:
    """Keyword arguments for ``model.generate``: every sampling knob explicit, so a model's own
    ``generation_config`` (top_k 50, repetition penalties, ...) cannot change what the settings say."""
    kwargs = dict(max_new_tokens=settings.max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id, use_cache=True,
                  do_sample=not settings.greedy, top_k=None if settings.greedy else 0, top_p=None, temperature=None,
                  repetition_penalty=None, num_beams=1)
    if not settings.greedy:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
    return kwargs


def constrained_kwargs(settings: SamplingSettings, kwargs: dict, mask: GrammarMask | None) -> dict:
    """``kwargs`` with a grammar mask that runs before temperature and top-p: ``generate`` appends custom
    processors after its own, and a mask applied after top-p could leave a row no token at all."""
    if mask is None:
        return kwargs
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    processors = [mask]
    if not settings.greedy:
        processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_p < 1:
            processors.append(TopPLogitsWarper(settings.top_p))
        kwargs = {**kwargs, "temperature": 1.0, "top_p": 1.0}  # no built-in warper: ours run after the mask
    return {**kwargs, "logits_processor": LogitsProcessorList(processors)}


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device):
    """Run the body with the random state seeded by ``seed``, restoring the previous state afterwards."""
    if seed is None:
        yield
        return
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)  # only this device, not every GPU (torch.manual_seed would)
        yield


def completion_of(tokenizer, generated: list[int], stop_ids: set[int], stop: Stops, prompt_tokens: int) -> Completion:
    """One row of ``generate``'s output cut at its first stop token or stop string (``stop``: the strings or
    their :class:`StopMatcher`)."""
    end = next((i for i, t in enumerate(generated) if t in stop_ids), None)
    ids = generated if end is None else generated[: end + 1]
    text = tokenizer.decode(ids if end is None else ids[:-1], skip_special_tokens=True)
    text, hit = as_matcher(stop).cut(text)
    if hit:
        ids = ids_within(tokenizer, ids, text)
    return Completion(token_ids=ids, text=text, finish_reason="stop" if (hit or end is not None) else "length",
                      prompt_tokens=prompt_tokens)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def ignores_position_ids(model) -> bool:
    """True for a PEFT prompt-learning model (prompt, prefix, p-tuning): peft drops ``position_ids`` for them
    ("Position ids are not supported"), so under left padding a padded row's tokens sit further from the
    virtual tokens than in training, and answers change with the batch (6 of 8 SQL answers of a prompt-tuned
    SmolLM2 differed between batch 8 and one at a time). Decoding those one prompt at a time keeps the
    answers the model gives alone, and no row waits for another that never stops (bench/NOTES.md)."""
    configs = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapter", None)
    config = configs.get(active) if isinstance(configs, dict) and isinstance(active, str) else None
    return bool(getattr(config, "is_prompt_learning", False))


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Prompt], settings: SamplingSettings | None = None, *,
             batch_size: int = 16, stop_token_ids: list[int] | None = None,
             should_stop: Callable[[], bool] | None = None,
             constraints: Sequence[Grammar | None] | None = None) -> list[Completion]:
    """Complete every prompt, ``batch_size`` at a time.

    Args:
        model: A causal LM, plain or PEFT-wrapped (``model.generate`` does the decoding, with its KV cache).
        tokenizer: The tokenizer whose chat template was used in training.
        prompts: Conversations (message lists ending with a user turn; rendered with the chat template and
            the generation prompt) or already-rendered strings, used as they are.
        settings: Sampling settings; default greedy, 128 new tokens.
        batch_size: Prompts per ``generate`` call (1 for prompt-learning PEFT models, whose positions left
            padding would shift). Greedy results do not depend on it; sampled ones do.
        stop_token_ids: Tokens that end a completion; default :func:`end_of_turn_ids` of the tokenizer.
        should_stop: Checked once per token; True ends every row at once (a server past its shutdown
            deadline), the completions then hold what was generated so far.
        constraints: Per prompt, a grammar its completion must follow (None: free), see
            :mod:`tunelab.generation.constrain`.

    Returns:
        One :class:`Completion` per prompt, in order.
    """
    settings = settings or SamplingSettings()
    if batch_size < 1:
        raise TunelabError(f"generation: batch_size {batch_size!r}: use a positive integer")
    if ignores_position_ids(model):
        batch_size = 1  # see ignores_position_ids: left padding would shift every padded row's positions
    stop_ids = list(stop_token_ids) if stop_token_ids is not None else end_of_turn_ids(tokenizer)
    pad = pad_id(tokenizer, stop_ids)
    rows = [render_prompt(tokenizer, p) for p in prompts]
    matcher = StopMatcher(settings.stop)
    device = model_device(model)
    was_training = model.training
    model.eval()
    results: list[Completion] = []
    try:
        with seeded(settings.seed, device):
            for start in range(0, len(rows), batch_size):
                grammars = row_matchers(tokenizer, constraints and constraints[start: start + batch_size], stop_ids)
                results += _batch(model, tokenizer, rows[start: start + batch_size], settings, stop_ids, pad, matcher,
                                  should_stop, grammars)
    finally:
        model.train(was_training)
    return results


def _batch(model, tokenizer, batch: list[list[int]], settings: SamplingSettings, stop_ids: list[int], pad: int,
           matcher: StopMatcher, should_stop, grammars) -> list[Completion]:
    """One ``model.generate`` call over the left-padded ``batch`` of prompt ids (``grammars``: per-row constraints)."""
    input_ids, attention_mask = left_pad(batch, pad, model_device(model))
    criteria = StopStrings(tokenizer, matcher, input_ids.shape[1], should_stop)
    mask = GrammarMask(grammars, input_ids.shape[1]) if grammars else None
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, stopping_criteria=[criteria],
                         **constrained_kwargs(settings, generate_kwargs(settings, stop_ids, pad), mask))
    new_tokens = out[:, input_ids.shape[1]:].tolist()  # (B, generated)
    return [completion_of(tokenizer, g, set(stop_ids), matcher, len(r)) for g, r in zip(new_tokens, batch)]
