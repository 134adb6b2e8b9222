"""Reward functions for GRPO: one contract, a registry of built-ins made from the evaluation metrics, and a
checked set that scores completions.

The contract (the only one)::

    fn(completions: list[str], prompts: list, **fields) -> list[float]

``completions`` are the N generated answers; ``prompts`` the N prompts they answer (a string or a list of chat
messages each, a prompt repeated once per completion of its group); ``fields`` are the data record's other
fields as lists of N values (``answer=[...]``, ``db=[...]``) together with the reward's own options from the
config (``pattern="..."``, one value, not a list). It returns one finite number per completion, in order.
A function that names ``completions`` and ``prompts`` as parameters is called with them by keyword (so
either order works); a function without ``**fields`` receives only the fields and options it names.

Config: ``grpo.rewards: [{fn: NAME or 'package.module:function', weight: 1.0, **options}]``. Built-ins
(:func:`reward_names`; registered in ``rewards.catalog`` by ``rewards.builtins``): ``sql_exec``, ``exact_match``, ``json_valid``, ``json_schema``, ``tool_call``, ``regex``,
``length_penalty`` and ``reward_model``; those that compare with a reference read it from the field named by
the option ``reference`` (default ``answer``). Each is a thin adapter over ``tunelab.evaluation.metrics``, so
a reward means exactly what the metric of the same name reports in evaluation.

A ``module:function`` runs in a worker process (:mod:`tunelab.rewards.guard`), each call limited to
``timeout`` seconds (``recipe.reward_timeout``): one that hangs, exits (``sys.exit``, ``os._exit``) or crashes
stops the run with an error naming it, like one that raises. Built-ins, and :class:`Reward` objects built in
Python, run in-process.

Every value is checked (:meth:`RewardSet.check`): a function that raises, returns a scalar, the wrong number
of values, ``None``, a non-number, NaN or inf stops with a :class:`TunelabError` naming the function and the
example, never a silent broadcast (TRL #6533) or a keyword TypeError from an undocumented call (TRL #4939).
Hand-written because no library offers a reward-function registry outside its own trainer.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.errors import TunelabError
from tunelab.registry import load_object
from tunelab.rewards.catalog import RewardFn, builtin_reward, register_reward, reward_names
from tunelab.rewards.guard import DEFAULT_TIMEOUT, Worker, WorkerStopped

__all__ = ["DEFAULT_TIMEOUT", "Reward", "RewardFn", "RewardSet", "load_reward", "register_reward", "reward_names"]
Fields = Mapping[str, Sequence] | Sequence[Mapping[str, Any]] | None  # {name: N values} or N records
Invoke = Callable[[tuple, dict], Any]  # (args, kwargs) -> what the function returned


# ------------------------------------------------------------------------------------------- loading specs

@dataclass(frozen=True)
class Reward:
    """One entry of ``grpo.rewards``: the function, its weight and its options.

    Attributes:
        name: The built-in name or the ``module:function`` text, as written in the config.
        fn: The function (the contract in the module docstring).
        weight: Its weight in the total reward.
        options: The entry's other keys, passed to every call.
        target: ``'module:function'`` for a user function, which then runs in the worker process; None runs
            ``fn`` in-process (built-ins).
    """

    name: str
    fn: RewardFn
    weight: float = 1.0
    options: dict = field(default_factory=dict)
    target: str | None = None

    @property
    def parameters(self) -> dict[str, inspect.Parameter] | None:
        """The function's parameters, or None when Python cannot read its signature."""
        with contextlib.suppress(TypeError, ValueError):
            return dict(inspect.signature(self.fn).parameters)
        return None


def _import_function(text: str) -> RewardFn:
    module_name, _, fn_name = text.partition(":")
    if not module_name or not fn_name:
        raise TunelabError(f"reward fn {text!r}: write a built-in name or 'package.module:function'")
    fn = load_object(text, what="reward fn")
    if not callable(fn):
        raise TunelabError(f"reward fn {text!r}: {fn_name!r} in {module_name!r} is a {type(fn).__name__}, not a "
                           "function; point at a function fn(completions, prompts, **fields) -> list[float]")
    return fn


def _check_options(reward: Reward) -> None:
    """Options a function cannot take, and required options left out, are config mistakes: say so now."""
    params = reward.parameters
    if params is None:
        return
    named = {k for k, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"completions", "prompts"}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    builtin = builtin_reward(reward.name) is reward.fn
    # A built-in's **fields are data fields, never options: an unknown option there is a typo.
    unknown = sorted(set(reward.options) - named) if builtin or not takes_any else []
    if unknown:
        raise TunelabError(f"reward {reward.name!r} does not take option(s) {', '.join(unknown)}; it takes: "
                           f"{', '.join(sorted(named)) or 'no options'}")
    required = sorted(k for k, p in params.items() if p.kind is p.KEYWORD_ONLY and p.default is p.empty)
    missing = [k for k in required if k not in reward.options] if builtin else []
    if missing:
        raise TunelabError(f"reward {reward.name!r} needs option(s) {', '.join(missing)}; add them to its "
                           f"grpo.rewards entry (see `{reward.name}`'s documentation)")


def load_reward(spec: Mapping[str, Any]) -> Reward:
    """A :class:`Reward` from one ``grpo.rewards`` entry ``{fn: NAME or 'module:function', weight: 1.0, **options}``.

    Raises:
        TunelabError: Not a mapping, no ``fn``, a bad weight, an unknown built-in (the choices are listed), a
            module that does not import, a missing or non-callable attribute, or options the function cannot take.
    """
    if not isinstance(spec, Mapping) or not isinstance(spec.get("fn"), str):
        raise TunelabError(f"reward entry {spec!r}: write it as {{fn: NAME or 'package.module:function', weight: 1.0, "
                           f"...options}}; built-in names: {', '.join(reward_names())}")
    options = {k: v for k, v in spec.items() if k not in ("fn", "weight")}
    name, weight = spec["fn"], spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
        raise TunelabError(f"reward {name!r}: weight={weight!r}; set it to a finite number (1.0 by default)")
    fn = _import_function(name) if ":" in name else builtin_reward(name)
    if fn is None:
        raise TunelabError(f"unknown reward {name!r}; built-in rewards: {', '.join(reward_names())}, or your own "
                           "function written as 'package.module:function'")
    reward = Reward(name, fn, float(weight), options, target=name if ":" in name else None)
    _check_options(reward)
    return reward


# ------------------------------------------------------------------------------------------ checked calls

def _snippet(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _values(label: str, out: Any, completions: list[str]) -> list[float]:
    """``out`` as N floats, or a TunelabError naming the function and the example."""
    n = len(completions)
    if hasattr(out, "tolist") and getattr(out, "ndim", 1) == 1:  # a 1-D numpy array or torch tensor
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise TunelabError(f"reward {label} returned {type(out).__name__} {_snippet(out)}, not a list of {n} numbers "
                           "(one per completion); a single value is never broadcast")
    if len(out) != n:
        raise TunelabError(f"reward {label} returned {len(out)} values for {n} completions; return exactly one "
                           "number per completion, in order")
    values = []
    for i, value in enumerate(out):
        where = f"example {i} (completion {_snippet(completions[i])})"
        if value is None:
            raise TunelabError(f"reward {label} returned None for {where}; return 0.0 (or another number) for "
                               "completions it does not apply to")
        if not isinstance(value, numbers.Real):
            raise TunelabError(f"reward {label} returned {type(value).__name__} {_snippet(value)} for {where}; "
                               "return a float (or int or bool) per completion")
        if not math.isfinite(value):
            raise TunelabError(f"reward {label} returned {value} for {where}; return a finite number")
        values.append(float(value))
    return values


def _arguments(reward: Reward, completions: list, prompts: list, fields: dict) -> tuple[tuple, dict]:
    """Positional and keyword arguments of one call, as the module docstring's contract says."""
    kwargs = {**fields, **reward.options}
    params = reward.parameters
    if params is None:
        return (completions, prompts), kwargs
    by_name = "completions" in params and "prompts" in params
    positional = [k for k, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    slots = {"completions", "prompts"} if by_name else set(positional[:2])
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params and k not in slots}
        missing = [k for k, p in params.items() if k not in slots and k not in kwargs and p.default is p.empty
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if missing:
            raise TunelabError(f"reward {reward.name!r} takes {', '.join(missing)}, which is neither a data field "
                               f"(the records have: {', '.join(sorted(fields)) or 'none'}) nor one of its options")
    if by_name:
        return (), {"completions": completions, "prompts": prompts, **kwargs}
    return (completions, prompts), kwargs


def _first_failing(reward: Reward, invoke: Invoke, completions: list, prompts: list, fields: dict) -> int | None:
    """The first example on which the function raises by itself (to name it), or None."""
    for i in range(len(completions)):
        one = {k: v[i:i + 1] for k, v in fields.items()}
        try:
            invoke(*_arguments(reward, completions[i:i + 1], prompts[i:i + 1], one))
        except WorkerStopped:
            raise
        except Exception:  # noqa: BLE001 - we are looking for the example that makes it raise
            return i
    return None


def _raised(reward: Reward, label: str, e: Exception, invoke: Invoke, completions: list, prompts: list,
            fields: dict) -> TunelabError:
    """The error for a function that raised ``e``, naming the example it raises on when there is one."""
    try:
        i = _first_failing(reward, invoke, completions, prompts, fields)
    except WorkerStopped as stop:
        return _stopped(label, stop)
    where = (f"on example {i} (completion {_snippet(completions[i])}, prompt {_snippet(prompts[i])})" if i is not None
             else f"on the batch of {len(completions)} completions (though on no single one)")
    kind = getattr(e, "kind", type(e).__name__)  # a WorkerError carries the type's name from the worker
    return TunelabError(f"reward {label} raised {kind}: {e} {where}; fix the function, its options or the data")


def _stopped(label: str, stop: WorkerStopped) -> TunelabError:
    fix = ("make it faster, or raise recipe.reward_timeout" if stop.timed_out
           else "return a list of numbers (raise an exception to report a problem)")
    return TunelabError(f"reward {label} {stop}; {fix}")


def _call(reward: Reward, label: str, invoke: Invoke, completions: list, prompts: list, fields: dict) -> list[float]:
    args, kwargs = _arguments(reward, completions, prompts, fields)
    try:
        out = invoke(args, kwargs)
    except WorkerStopped as stop:  # hung or ended: no per-example retry
        raise _stopped(label, stop) from None
    except TunelabError as e:  # already says what to fix (a missing db, a failing gold query): no per-example retry,
        raise TunelabError(f"reward {label}: {e}") from e  # which would reload a reward model N times
    except Exception as e:  # noqa: BLE001 - a failing reward function is reported, with the example, to its author
        raise _raised(reward, label, e, invoke, completions, prompts, fields) from e
    return _values(label, out, completions)


class RewardSet:
    """The reward functions of a run, weighted, every value checked.

    User ``module:function`` rewards share one worker process, started on the first call and stopped by
    :meth:`close` (or when the set is garbage-collected, or at exit).

    Args:
        specs: ``grpo.rewards`` entries (see :func:`load_reward`), or :class:`Reward` objects.
        timeout: Seconds one call of a user function may take before it is stopped (``recipe.reward_timeout``).
    """

    def __init__(self, specs: Sequence[Mapping[str, Any] | Reward], *, timeout: float = DEFAULT_TIMEOUT):
        if not specs:
            raise TunelabError("grpo.rewards is empty; give at least one reward, e.g. [{fn: exact_match}]")
        if not timeout > 0:
            raise TunelabError(f"reward timeout {timeout!r}: set recipe.reward_timeout to a positive number of seconds")
        self.timeout = float(timeout)
        self._worker = Worker()
        self._finalizer = weakref.finalize(self, self._worker.close)
        self.rewards = [s if isinstance(s, Reward) else load_reward(s) for s in specs]
        seen: dict[str, int] = {}
        self.names: list[str] = []  # unique labels for logs: a repeated fn gets "#2", "#3"
        for reward in self.rewards:
            seen[reward.name] = seen.get(reward.name, 0) + 1
            self.names.append(reward.name if seen[reward.name] == 1 else f"{reward.name}#{seen[reward.name]}")
        self.weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float32)  # (F,)

    def close(self) -> None:
        """Stop the worker process of the user functions (a later call starts a new one)."""
        self._worker.close()

    def _invoke(self, reward: Reward) -> Invoke:
        if reward.target is None:
            return lambda args, kwargs: reward.fn(*args, **kwargs)
        return lambda args, kwargs: self._worker.call(reward.target, args, kwargs, self.timeout)

    @staticmethod
    def _columns(fields: Fields, n: int) -> dict[str, list]:
        """``fields`` as one list of N values per field; records missing a field give None for it."""
        if fields is None:
            return {}
        if isinstance(fields, Mapping):
            return dict(fields)
        if not isinstance(fields, (list, tuple)) or not all(isinstance(r, Mapping) for r in fields):
            raise TunelabError("rewards: pass fields as {name: N values} or as N records {name: value}")
        if len(fields) != n:
            raise TunelabError(f"rewards: {len(fields)} records of fields for {n} completions; give one per completion")
        names = list(dict.fromkeys(key for record in fields for key in record))
        return {key: [record.get(key) for record in fields] for key in names}

    def _check_inputs(self, completions: list[str], prompts: list, fields: dict[str, list]) -> None:
        n = len(completions)
        if not all(isinstance(c, str) for c in completions):
            raise TunelabError("rewards: every completion must be a string")
        if len(prompts) != n:
            raise TunelabError(f"rewards: {len(prompts)} prompts for {n} completions; repeat each prompt once per completion")
        for key, values in fields.items():
            if key in ("completions", "prompts"):
                raise TunelabError(f"data field {key!r} clashes with the reward functions' own argument; rename the field")
            if not isinstance(values, (list, tuple)) or len(values) != n:
                raise TunelabError(f"rewards: data field {key!r} must hold one value per completion ({n}), got "
                                   f"{len(values) if isinstance(values, (list, tuple)) else type(values).__name__}")
        for reward, label in zip(self.rewards, self.names):
            clash = sorted(set(reward.options) & set(fields))
            if clash:
                raise TunelabError(f"reward {label!r}: option(s) {', '.join(clash)} also name data field(s); keep one "
                                   "(remove the option to use the field per record, or rename the field)")

    def check(self, completions: list[str], prompts: list, fields: Fields = None) -> dict[str, list[float]]:
        """``{label: N floats}``: every function's values on N completions, their N prompts (repeated per
        completion of a group) and the records' other ``fields`` (``{name: N values}``, or N records
        ``{name: value}``, one per completion), in the order of the specs.

        Raises:
            TunelabError: Mismatched inputs, or a function that raises or returns anything but N finite numbers
                (naming the function and the example).
        """
        fields = self._columns(fields, len(completions))
        self._check_inputs(completions, prompts, fields)
        return {label: _call(r, repr(label), self._invoke(r), list(completions), list(prompts), fields)
                for r, label in zip(self.rewards, self.names)}

    def score(self, completions: list[str], prompts: list, fields: Fields = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(per_function (N, F), total (N,))``: each function's values and their weighted sum; as :meth:`check`."""
        values = self.check(completions, prompts, fields)
        per_function = torch.tensor([values[label] for label in self.names], dtype=torch.float32).T  # (N, F)
        return per_function, per_function @ self.weights

    def dry_run(self, completions: list[str] | None, prompts: list, fields: Fields = None, *,
                n: int = 4) -> dict[str, list[float]]:
        """Call every function once on the first ``n`` records, before any training; :meth:`check`'s values.

        ``completions`` None gives each an empty completion (a model does produce those, and a function must
        score them); pass the references as completions to see the best reward too.
        """
        k = min(n, len(prompts))
        if k == 0:
            raise TunelabError("rewards dry run: no prompts to try the reward functions on; check the training data")
        if completions is not None and len(completions) < k:
            raise TunelabError(f"rewards dry run: {len(completions)} completions for {k} prompts")
        columns = {key: list(values[:k]) for key, values in self._columns(fields, len(prompts)).items()}
        return self.check(list(completions[:k]) if completions is not None else [""] * k, list(prompts[:k]), columns)
