"""Writing an example task's train/test splits as JSONL, shared by the generated tasks."""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.atomic import write_text_atomic


def write_jsonl_splits(directory: str | Path, train: list[dict], test: list[dict]) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` into ``directory``, each atomically; return their paths."""
    directory = Path(directory)
    paths = (directory / "train.jsonl", directory / "test.jsonl")
    for path, rows in zip(paths, (train, test)):
        write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return paths
