"""The built-in reward functions (``tunelab.rewards.functions`` holds the contract and the checks, ``catalog`` the
registry).

Each is a thin adapter over ``tunelab.evaluation.metrics``, so a reward means exactly what the metric of the
same name reports in evaluation; those that compare with a reference read it from the field named by the
option ``reference`` (default ``answer``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.evaluation import metrics
from tunelab.rewards.catalog import register_reward

_REWARD_MODELS: dict[str, Any] = {}  # run dir -> loaded reward model: loaded once per process


def _references(name: str, reference: str, fields: dict) -> list:
    if reference not in fields:
        raise TunelabError(f"reward {name!r} compares with the data field {reference!r}, which the records do not have "
                           f"(they have: {', '.join(sorted(fields)) or 'no other fields'}); add it to the data or set "
                           "the reward's option reference: to the field holding the reference answer")
    return fields[reference]


@register_reward("exact_match")
def exact_match(completions: list[str], prompts: list, *, reference: str = "answer", normalize: bool = True,
                **fields: Any) -> list[float]:
    """1.0 when the completion equals the reference (or one of a list of accepted answers), after
    whitespace and case normalisation unless ``normalize: false``."""
    refs = _references("exact_match", reference, fields)
    return metrics.score("exact_match", completions, refs, normalize=normalize).per_example


@register_reward("sql_exec")
def sql_exec(completions: list[str], prompts: list, *, db: Any = None, reference: str = "answer",
             timeout_s: float = 2.0, max_rows: int = 10_000, max_bytes: int = 10_000_000, **fields: Any) -> list[float]:
    """1.0 when the completion's SQL returns the same result set as the reference query on the SQLite ``db``
    (the evaluation metric ``sql_exec``: order matters only when the reference has a top-level ORDER BY).

    ``db`` is an option (one database for all) or a data field (one per record); completions that fail to run
    score 0.
    """
    if db is None:
        raise TunelabError("reward 'sql_exec' needs a database: set the option db: <path of a SQLite file>, "
                           "or give every record a db field")
    refs = _references("sql_exec", reference, fields)
    dbs = list(db) if isinstance(db, (list, tuple)) else [db] * len(completions)
    scores = [0.0] * len(completions)
    for one_db in dict.fromkeys(str(d) for d in dbs):  # one query process per database, in first-seen order
        rows = [i for i, d in enumerate(dbs) if str(d) == one_db]
        result = metrics.score("sql_exec", [completions[i] for i in rows], [refs[i] for i in rows], db=one_db,
                               timeout_s=timeout_s, max_rows=max_rows, max_bytes=max_bytes)
        for i, value in zip(rows, result.per_example):
            scores[i] = value
    return scores


@register_reward("json_valid")
def json_valid(completions: list[str], prompts: list, **fields: Any) -> list[float]:
    """1.0 when the completion (or the body of its Markdown code fence) parses as JSON."""
    return metrics.score("json_valid", completions, [""] * len(completions)).per_example


@register_reward("json_schema")
def json_schema(completions: list[str], prompts: list, *, schema: Any, **fields: Any) -> list[float]:
    """1.0 when the completion is JSON valid against ``schema`` (a dict, or the path of a .json schema)."""
    return metrics.score("json_schema", completions, [""] * len(completions), schema=schema).per_example


@register_reward("regex")
def regex(completions: list[str], prompts: list, *, pattern: str, flags: str | int = 0, **fields: Any) -> list[float]:
    """1.0 when ``pattern`` is found in the completion (``re.search``; ``flags`` letters i, m, s, x, a);
    anchor it (``^...$``) to demand a whole format."""
    try:
        re.compile(pattern)  # here for a message naming the option; the metric checks flags and compiles with them
    except (re.error, TypeError) as e:
        raise TunelabError(f"reward 'regex': option pattern {pattern!r} is not a valid regular expression ({e}); "
                           "fix it in grpo.rewards") from e
    return metrics.score("regex", completions, [pattern] * len(completions), flags=flags).per_example


@register_reward("tool_call")
def tool_call(completions: list[str], prompts: list, *, reference: str = "tool_calls", **fields: Any) -> list[float]:
    """Credit for calling the expected functions with the expected arguments: per call, half for the right
    name and half times the share of arguments right, over the larger of the expected and the made calls;
    with no call expected (the field empty or null), 1.0 for an answer without a call, else 0 (the ``partial``
    of the ``tool_call`` metric). The calls are read from the field ``reference`` (default ``tool_calls``:
    OpenAI calls or ``{"name", "arguments"}`` objects); a ``tools`` field adds nothing to the score (the
    metric's schema check is reported in evaluation)."""
    from tunelab.data.tool_parse import plain_calls
    from tunelab.evaluation.tool_metrics import score_calls

    refs = _references("tool_call", reference, fields)
    scores = []
    for n, (completion, expected) in enumerate(zip(completions, refs)):
        try:
            calls = plain_calls(expected)
        except ValueError as e:
            raise TunelabError(f"reward 'tool_call': the field {reference!r} of completion {n + 1}'s record is not a list of calls: {e}; "
                               'write [{"name": ..., "arguments": {...}}, ...] or OpenAI tool_calls') from None
        scores.append(score_calls(completion, calls)[1]["partial"])
    return scores


_UNITS = {"words": lambda text: len(text.split()), "chars": len}


@register_reward("length_penalty")
def length_penalty(completions: list[str], prompts: list, *, max_length: int | None = None, target: int | None = None,
                   unit: str = "words", **fields: Any) -> list[float]:
    """A penalty in [-1, 0] on the completion's length, in ``unit`` ("words" or "chars"); give it a weight
    and add it to a task reward.

    With ``max_length: L``: 0 up to L, then falling linearly to -1 at 2L (long answers cost, short are free).
    With ``target: L``: ``-|n - L| / L``, floored at -1 (both shorter and longer answers cost).
    Counted on the text because a reward function sees text only; the recipe's ``max_completion_length``
    caps tokens anyway.
    """
    if (max_length is None) == (target is None):
        raise TunelabError("reward 'length_penalty': set exactly one of the options max_length: (penalise only "
                           "longer answers) or target: (penalise any distance from it)")
    limit = max_length if max_length is not None else target
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise TunelabError(f"reward 'length_penalty': {'max_length' if max_length is not None else 'target'}="
                           f"{limit!r}; set it to a positive whole number of {unit}")
    if unit not in _UNITS:
        raise TunelabError(f"reward 'length_penalty': unit={unit!r}; use one of {', '.join(_UNITS)}")
    lengths = [_UNITS[unit](c) for c in completions]
    excess = [max(0, n - limit) if max_length is not None else abs(n - limit) for n in lengths]
    return [-min(1.0, e / limit) for e in excess]


@register_reward("reward_model")
def reward_model(completions: list[str], prompts: list, *, run: str | Path, batch_size: int = 8,
                 **fields: Any) -> list[float]:
    """The score of a reward model trained with ``recipe: reward`` (option ``run``: its run directory),
    loaded once per process (``tunelab.rewards.load``)."""
    import tunelab.rewards as reward_models

    key = str(Path(run).resolve())
    if key not in _REWARD_MODELS:
        _REWARD_MODELS[key] = reward_models.load(run)
    return _REWARD_MODELS[key].score(list(prompts), list(completions), batch_size=batch_size)
