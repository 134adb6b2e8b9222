"""The registry of built-in reward functions: ``@register_reward`` and the lookups by name.

A leaf of ``tunelab.rewards``: ``builtins`` registers here and ``functions`` looks up here, and neither
imports the other (the registry imports ``builtins`` by name on its first lookup). The registry is read
through this module's ``REWARDS`` at each call, so a test may swap it for a copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tunelab.registry import Registry

RewardFn = Callable[..., Sequence[float]]

REWARDS: Registry[RewardFn] = Registry("reward", modules=("tunelab.rewards.builtins",))


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register a built-in reward function under ``name`` (usable as ``fn: name`` in ``grpo.rewards``)."""
    if not name or ":" in name:
        raise ValueError(f"reward name {name!r}: use a non-empty name without ':' (that form is module:function)")
    return lambda fn: REWARDS.register(name, fn)


def reward_names() -> list[str]:
    """The built-in reward names."""
    return REWARDS.names()


def builtin_reward(name: str) -> RewardFn | None:
    """The built-in reward function called ``name``, or None."""
    return REWARDS.find(name)
