"""The preference recipe's stages: read and tokenize pairs, pick the reference, compute and cache its log-probabilities.

The reference model is the model training starts from (``recipe.reference: start``, the default: the base,
or the ``init_from`` parent) or any other model or run (a path or spec). It costs no second copy of the
weights where possible: when the tuning method can be switched off and starts where the base is, the
reference is the policy with its method disabled. Otherwise (a continued parent's adapter, full
fine-tuning, PiSSA, another model, or ``recipe.precompute_reference: true``) the reference log-probabilities
of every pair are computed once, before any checkpoint is restored, and cached on disk under
``$TUNELAB_CACHE/reference/`` keyed by what decides them (the reference's weights, the precision, the
tokenized pairs), so a resume or a second run over the same pairs reuses them.
"""

from __future__ import annotations

import hashlib
import os
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from tunelab.atomic import fsync_dir
from tunelab.config.schema import RunConfig
from tunelab.data import data_fingerprint
from tunelab.data.preferences import PreferenceExample, PreferenceStats, TokenizedPair, load_preferences, tokenize_preferences
from tunelab.data.text import split_holdout
from tunelab.errors import DataError, TunelabError
from tunelab.models.embedded import cache_root
from tunelab.stages.lineage import read_parent
from tunelab.stages.model import TunedModel, start_is_method_off
from tunelab.training.pair_loop import Reference, disabled_reference, no_reference, reference_table, table_reference
from tunelab.training.preference import PreferenceLossSpec

CACHE_VERSION = "1"


@dataclass
class Pairs:
    train: list[PreferenceExample]
    eval: list[PreferenceExample] = field(default_factory=list)


@dataclass
class TokenizedPairs:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    stats: PreferenceStats


def read_pairs(config: RunConfig, holdout: float) -> Pairs:
    """Every train and eval pair validated (all bad records at once, ``file:line: reason``); without
    ``data.eval``, every k-th train pair held out (``holdout`` of them)."""
    problems: list[str] = []
    found: dict[str, list[PreferenceExample]] = {}
    for split, files in (("train", config.data.train_files()), ("eval", config.data.eval_files())):
        try:
            found[split] = load_preferences(files, system_prompt=config.data.system_prompt) if files else []
        except DataError as err:
            problems += err.problems
    if problems:
        raise DataError(problems, what=", ".join(config.data.train_files() + config.data.eval_files()))
    if not found["eval"]:
        found["train"], found["eval"] = split_holdout(found["train"], holdout)
    return Pairs(found["train"], found["eval"])


def tokenize_pairs(config: RunConfig, tokenizer, pairs: Pairs) -> TokenizedPairs:
    """Both sides of every pair with the training chat template; a pair left without answer tokens is refused."""
    kwargs = dict(max_length=config.data.max_length, too_long=config.data.too_long)
    train, stats = tokenize_preferences(pairs.train, tokenizer, **kwargs)
    if not train:
        raise DataError([f"no preference pair is left after tokenization ({len(stats.dropped)} dropped as too long); "
                         "raise data.max_length"], what="data.train")
    held = tokenize_preferences(pairs.eval, tokenizer, **kwargs)[0] if pairs.eval else []
    return TokenizedPairs(train, held, stats)


def live_reference_works(config: RunConfig, reference: str, precompute: bool) -> bool:
    """The reference is the start model, and the policy with its method switched off computes exactly that."""
    return reference == "start" and not precompute and start_is_method_off(config)


def choose_references(config: RunConfig, spec: PreferenceLossSpec, tuned: TunedModel, data: TokenizedPairs, *,
                      reference: str, precompute: bool, env, tokenizer, console: Console) -> tuple[tuple[Reference, Reference], str]:
    """(train and eval references, a description); call before a checkpoint is restored (the start weights)."""
    if spec.reference_free:
        return (no_reference, no_reference), f"none (loss {spec.name} is reference-free)"
    if live_reference_works(config, reference, precompute):
        unwrap = env.accelerator.unwrap_model
        live = disabled_reference(lambda model: tuned.method.disabled(unwrap(model)))
        return (live, live), f"the start model ({tuned.method.name} switched off; no second copy)"
    identity = _identity(config, reference)
    tables = [_cached_table(identity, split, pairs, env, console, lambda todo: _compute(config, reference, tuned, tokenizer, todo, env))
              for split, pairs in (("train", data.train), ("eval", data.eval))]
    what = "the start model" if reference == "start" else reference
    return (table_reference(tables[0]), table_reference(tables[1])), f"{what}, log-probabilities precomputed and cached"


def _identity(config: RunConfig, reference: str) -> dict:
    """What decides the reference's log-probabilities, apart from the pairs."""
    from tunelab.models.load import resolve_model_path
    from tunelab.runs import open_run

    if reference == "start":
        parent = read_parent(config)
        model_path = resolve_model_path(config.model.path)
        return {"start": True, "base": data_fingerprint([model_path]), "dtype": config.model.dtype,
                "parent": parent.record()["artifact_hash"] if parent else None, "merge": config.init_from_merge,
                "method": {"name": config.method.name, **config.method.options()}, "seed": config.train.seed}
    run = open_run(reference)
    if run is not None:
        return {"run": data_fingerprint([str(run.artifact_dir)]), "base": data_fingerprint([run.base_model])}
    return {"model": data_fingerprint([resolve_model_path(reference)])}


def _compute(config: RunConfig, reference: str, tuned: TunedModel, tokenizer, pairs: list[TokenizedPair], env) -> torch.Tensor:
    kwargs = dict(batch_size=config.train.batch_size, pad_id=tokenizer.pad_token_id, device=env.accelerator.device,
                  autocast=env.accelerator.autocast)
    if reference == "start":
        return reference_table(tuned.model, pairs, **kwargs)
    from tunelab.evaluation.run import load_for_eval

    other = load_for_eval(reference)
    if other.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise TunelabError(f"recipe.reference={reference}: its vocabulary differs from model.path={config.model.path}'s, so "
                           "it cannot score the same tokens; use a reference trained from the same base model")
    table = reference_table(other.model.to(env.accelerator.device), pairs, **kwargs)
    del other
    return table


def _cached_table(identity: dict, split: str, pairs: list[TokenizedPair], env, console: Console, compute) -> torch.Tensor:
    """The table of ``pairs`` under the reference ``identity``: read from the cache, or ``compute(pairs)`` and stored."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "identity": identity, "precision": env.precision, "split": split,
                                     "pairs": _pairs_digest(pairs)}, sort_keys=True).encode()).hexdigest()
    path = cache_root() / "reference" / f"{key}.safetensors"
    if not pairs:
        return torch.zeros((0, 2))
    if path.is_file():
        return load_file(str(path))["logps"]
    console.print(f"Computing the reference log-probabilities of the {split} pairs (cached for resumes and later runs) ...")
    table = compute(pairs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: ranks of one job write the same table at once
    save_file({"logps": table.contiguous()}, str(tmp))
    tmp.replace(path)
    fsync_dir(path.parent)
    return table


def _pairs_digest(pairs: list[TokenizedPair]) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        for side in (pair.chosen, pair.rejected):
            digest.update(json.dumps([side.input_ids, side.labels]).encode())
    return digest.hexdigest()


def reference_path(config: RunConfig, value: str) -> str:
    """``recipe.reference`` checked before anything loads: ``start``, a run directory, or a model spec."""
    if value == "start":
        return value
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path)
    from tunelab.models.load import resolve_model_path

    try:
        return resolve_model_path(value)
    except TunelabError as exc:
        raise TunelabError(f"recipe.reference={value}: {exc}") from None
