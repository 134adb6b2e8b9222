"""Environments for agentic GRPO (``recipe.environment: module:Class``): the contract, and the guarded client the
training loop talks to.

The contract, for a class named in ``recipe.environment`` (built with ``recipe.environment_options`` as keyword
arguments, one instance per episode)::

    tools: list[dict]                          # OpenAI tools schema, one entry per callable the model may call
    reset(record, seed=...) -> list | None     # the episode's opening messages; None keeps the record's prompt;
                                               # ``seed`` (if it takes one) is a function of (run seed, step, episode)
    step(tool_calls) -> list                   # one result per call, in order: a string, or a dict with "content"
                                               # (and optionally "error": True, counted as a tool error)
    reward(episode) -> float                   # optional; episode = {"messages", "turns", "tool_errors", "record"}
    close()                                    # optional; called when the episode ends

``tool_calls`` are ``{"id", "name", "arguments": dict}``. Without ``reward`` the recipe's reward functions score
the episode's final answer. :class:`ToolEnvironment` implements the contract over a dict of Python functions
(schemas read from their signatures by :func:`tool_schema`); ``tunelab.rewards.tool_envs`` holds the built-ins.

Every call runs in the worker process of :mod:`tunelab.rewards.guard` with ``recipe.environment_timeout``
seconds per call, like user reward functions: an environment that raises, hangs, ends its process or returns
the wrong types stops training with a :class:`TunelabError` naming the environment, the method and the example.
The instances live in the worker (the worker side is :func:`env_call`). Hand-written: no library runs
environments outside its own trainer.
"""

from __future__ import annotations

import inspect
import math
import numbers
import weakref
from collections.abc import Callable
from typing import Any

from tunelab.errors import TunelabError
from tunelab.registry import load_object
from tunelab.rewards.guard import DEFAULT_ENV_TIMEOUT, Worker, WorkerStopped
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


# ------------------------------------------------------------------------------------ Python tool sets

def tool_schema(fn: Callable) -> dict:
    """The OpenAI tools entry of a Python function: its name, its docstring's first paragraph, and one parameter
    per argument typed from its annotation (str, int, float, bool, list, dict; anything else: string)."""
    properties, required = {}, []
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = param.annotation if not isinstance(param.annotation, str) else \
            {t.__name__: t for t in _JSON_TYPES}.get(param.annotation, str)
        properties[name] = {"type": _JSON_TYPES.get(annotation, "string")}
        if param.default is param.empty:
            required.append(name)
    doc = (inspect.getdoc(fn) or fn.__name__).split("\n\n")[0].strip()
    return {"type": "function", "function": {"name": fn.__name__, "description": doc,
                                             "parameters": {"type": "object", "properties": properties, "required": required}}}


class ToolEnvironment:
    """The contract over Python functions: ``functions`` maps a tool name to its callable. A call to an unknown
    tool, with bad arguments or that raises becomes an ``error: ...`` result the model reads (a tool error)."""

    functions: dict[str, Callable] = {}

    @property
    def tools(self) -> list[dict]:
        return [tool_schema(fn) for fn in self.functions.values()]

    def reset(self, record: dict) -> list | None:
        return None

    def step(self, tool_calls: list[dict]) -> list[dict]:
        results = []
        for call in tool_calls:
            fn = self.functions.get(call["name"])
            if fn is None:
                results.append({"content": f"error: no tool named {call['name']!r}; tools: {', '.join(self.functions)}",
                                "error": True})
                continue
            try:
                results.append({"content": str(fn(**call["arguments"]))})
            except Exception as e:  # noqa: BLE001 - a failing tool call is the model's mistake, reported to it
                results.append({"content": f"error: {type(e).__name__}: {e}", "error": True})
        return results


# ------------------------------------------------------------------------------------ the worker's side

_INSTANCES: dict[str, Any] = {}


def env_call(spec: str, options: dict, key: str, method: str, args: tuple) -> Any:
    """Run in the worker: ``method`` of episode ``key``'s instance (``reset`` makes a new one; ``describe``
    reports the tools and whether it has ``reward``; ``close`` drops it)."""
    if method in ("describe", "reset"):
        instance = load_object(spec, what="environment")(**options)
        if method == "describe":
            return {"tools": instance.tools, "has_reward": callable(getattr(instance, "reward", None))}
        _INSTANCES[key] = instance
        record, seed = args
        takes_seed = "seed" in inspect.signature(instance.reset).parameters
        return instance.reset(record, seed=seed) if takes_seed else instance.reset(record)
    instance = _INSTANCES[key]
    if method == "close":
        _INSTANCES.pop(key)
        closer = getattr(instance, "close", None)
        return closer() if callable(closer) else None
    return getattr(instance, method)(*args)


# ------------------------------------------------------------------------------------ the trainer's side

def _bad(spec: str, method: str, where: str, what: str) -> TunelabError:
    return TunelabError(f"environment {spec!r}: {method} {where} returned {what}")


class EnvironmentClient:
    """The training process's handle on an environment: every call guarded, every value checked.

    Args:
        spec: ``recipe.environment`` (``'module:Class'``).
        options: ``recipe.environment_options``, keyword arguments of the class.
        timeout: Seconds per call (``recipe.environment_timeout``).
    """

    def __init__(self, spec: str, options: dict | None = None, *, timeout: float = DEFAULT_ENV_TIMEOUT):
        self.spec, self.options, self.timeout = spec, dict(options or {}), float(timeout)
        self._worker = Worker()
        self._finalizer = weakref.finalize(self, self._worker.close)
        described = self._call("describe", "", (), "on start")
        self.tools = self._check_tools(described.get("tools") if isinstance(described, dict) else None)
        self.has_reward = bool(described["has_reward"])

    def _call(self, method: str, key: str, args: tuple, where: str) -> Any:
        try:
            return self._worker.call("tunelab.rewards.environment:env_call", (self.spec, self.options, key, method, args),
                                     {}, self.timeout)
        except WorkerStopped as stop:
            fix = "make it faster, or raise recipe.environment_timeout" if stop.timed_out else "return instead of exiting"
            raise TunelabError(f"environment {self.spec!r}: {method} {where} {stop}; {fix}") from None
        except TunelabError as e:
            raise TunelabError(f"environment {self.spec!r}: {method} {where}: {e}") from None
        except Exception as e:  # noqa: BLE001 - WorkerError and anything the arguments raise
            kind = getattr(e, "kind", type(e).__name__)
            raise TunelabError(f"environment {self.spec!r}: {method} {where} raised {kind}: {e}; fix the environment "
                               "or the data") from None

    def _check_tools(self, tools: Any) -> list[dict]:
        names = [t.get("function", {}).get("name") if isinstance(t, dict) and isinstance(t.get("function"), dict) else None
                 for t in tools or ()]
        if not isinstance(tools, list) or not tools or not all(isinstance(n, str) and n for n in names):
            raise _bad(self.spec, "tools", "on start", f"{tools!r:.80}, not a non-empty list of OpenAI tools "
                       "entries {'type': 'function', 'function': {'name', 'description', 'parameters'}}")
        return tools

    def reset(self, key: str, record: dict, seed: int, where: str) -> list[dict] | None:
        """The episode's opening messages (None: the record's prompt)."""
        out = self._call("reset", key, (record, seed), where)
        if out is not None and not (isinstance(out, list) and out and all(isinstance(m, dict) and "role" in m for m in out)):
            raise _bad(self.spec, "reset", where, f"{out!r:.80}; return a list of {{'role', 'content'}} messages or None")
        return out

    def step(self, key: str, calls: list[dict], where: str) -> tuple[list[dict], int]:
        """``(tool messages, tool errors)`` for ``calls`` (``{"id", "name", "arguments"}``)."""
        out = self._call("step", key, (calls,), where)
        if not isinstance(out, list) or len(out) != len(calls):
            raise _bad(self.spec, "step", where, f"{out!r:.80} for {len(calls)} call(s); return one result per call")
        messages, errors = [], 0
        for call, result in zip(calls, out):
            content = result.get("content") if isinstance(result, dict) else result
            if not isinstance(content, str):
                raise _bad(self.spec, "step", where, f"{result!r:.80}; each result is a string or {{'content': str}}")
            errors += bool(isinstance(result, dict) and result.get("error"))
            messages.append({"role": "tool", "tool_call_id": call["id"], "name": call["name"], "content": content})
        return messages, errors

    def reward(self, key: str, episode: dict, where: str) -> float:
        out = self._call("reward", key, (episode,), where)
        if isinstance(out, bool) or not isinstance(out, numbers.Real) or not math.isfinite(out):
            raise _bad(self.spec, "reward", where, f"{out!r:.80}; return one finite number")
        return float(out)

    def close_episode(self, key: str, where: str) -> None:
        self._call("close", key, (), where)

    def close(self) -> None:
        """Stop the worker process."""
        self._worker.close()
