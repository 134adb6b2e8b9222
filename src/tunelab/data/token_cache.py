"""Tokenized datasets cached on disk, so a second run over the same data starts training at once.

Tokenizing is chat-template rendering plus masking in Python for every example: on the 2-core dev
machine 1,500 examples of ~445 tokens take ~3 s, about as long as the whole fine-tune is meant to take
on a GPU (bench/NOTES.md). ``datasets.map`` caches by fingerprinting a function, which is fragile for
our closures and would make ``datasets`` a training dependency; the cache here is keyed on what
decides the result instead:

* the examples themselves (messages and sources, after format conversion, so any change to the data
  files, ``data.format``, ``data.template`` or ``data.system_prompt`` changes the key);
* the tokenizer (its full serialized vocabulary and rules, the chat template, special tokens);
* the masking options (``loss_on``, ``max_length``, ``too_long``) and the versions of this module's
  format, ``tokenizers`` and ``transformers``.

An entry is one safetensors file (token ids and labels as flat int32 tensors plus offsets; sources and
statistics as JSON metadata), written to a temporary name and renamed, under
``$TUNELAB_CACHE/tokenized/``, or the folder ``TUNELAB_TOKENIZED_CACHE`` names. Delete that folder to
clear it; ``TUNELAB_TOKENIZED_CACHE=0`` bypasses it. It is set by environment, not by a config key: it
never changes a result, so it must not change a run's config hash.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from tunelab.data.records import Example
from tunelab.data.tokenize import TokenizedExample, TokenizeStats, tokenize_examples

FORMAT_VERSION = "1"  # bump when tokenize_examples changes what it produces


OFF = ("0", "false", "no", "off")


def cache_dir() -> Path:
    from tunelab.models.embedded import cache_root

    setting = os.environ.get("TUNELAB_TOKENIZED_CACHE", "").strip()
    return Path(setting).expanduser() if setting and setting.lower() not in OFF else cache_root() / "tokenized"


def cache_enabled() -> bool:
    return os.environ.get("TUNELAB_TOKENIZED_CACHE", "").strip().lower() not in OFF


def cached_tokenize(examples: list[Example], tokenizer, **options) -> tuple[list[TokenizedExample], TokenizeStats, bool]:
    """:func:`tunelab.data.tokenize_examples`, from the cache when the same job was tokenized before.

    Returns:
        (examples, statistics, whether they came from the cache).
    """
    if not cache_enabled():
        return (*tokenize_examples(examples, tokenizer, **options), False)
    path = cache_dir() / f"{cache_key(examples, tokenizer, options)}.safetensors"
    if path.is_file():
        try:
            return (*_read(path), True)
        except Exception:  # noqa: BLE001 - any damaged entry (safetensors raises its own error type): tokenize again
            pass
    tokenized, stats = tokenize_examples(examples, tokenizer, **options)
    try:
        _write(path, tokenized, stats)
    except OSError:  # a read-only or full cache must not stop training
        pass
    return tokenized, stats, False


def cache_key(examples: list[Example], tokenizer, options: dict) -> str:
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    header = {"format": FORMAT_VERSION, "tokenizers": tokenizers.__version__, "transformers": transformers.__version__,
              "options": sorted(options.items()), "chat_template": tokenizer.chat_template,
              "special": [tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id],
              "specials_map": sorted(map(str, tokenizer.all_special_ids))}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    for example in examples:
        tools = [list(example.tools)] if example.tools else []  # absent for plain chat: earlier keys stay valid
        digest.update(json.dumps([example.source, list(example.messages), *tools], sort_keys=True).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def _write(path: Path, tokenized: list[TokenizedExample], stats: TokenizeStats) -> None:
    from safetensors.torch import save_file

    lengths = [len(ex.input_ids) for ex in tokenized]
    tensors = {
        "input_ids": torch.tensor([t for ex in tokenized for t in ex.input_ids], dtype=torch.int32),
        "labels": torch.tensor([t for ex in tokenized for t in ex.labels], dtype=torch.int32),
        "lengths": torch.tensor(lengths, dtype=torch.int64),
    }
    metadata = {"sources": json.dumps([ex.source for ex in tokenized]), "stats": json.dumps(asdict(stats))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> tuple[list[TokenizedExample], TokenizeStats]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        ids, labels, lengths = (handle.get_tensor(k).tolist() for k in ("input_ids", "labels", "lengths"))
    sources = json.loads(metadata["sources"])
    if len(sources) != len(lengths) or sum(lengths) != len(ids) or len(ids) != len(labels):
        raise ValueError(f"{path}: inconsistent cache entry")
    tokenized, start = [], 0
    for source, n in zip(sources, lengths):
        tokenized.append(TokenizedExample(ids[start : start + n], labels[start : start + n], source))
        start += n
    return tokenized, TokenizeStats(**json.loads(metadata["stats"]))
