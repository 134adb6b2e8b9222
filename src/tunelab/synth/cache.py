"""The resume cache of ``tunelab data synth``: every generator reply, appended as it arrives.

A reply is stored under the hash of what produced it (the generator's identity, the decoding settings,
the conversation), one JSON line each, flushed after every batch; a crash loses at most the batch in
flight, and a re-run answers every request already made from the file instead of the model. A torn last
line (the crash happened mid-write) is ignored. Changing the prompts, settings or generator changes the
keys, so stale replies are never reused; filters run after generation, so changing a threshold re-runs
no model at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def request_key(identity: dict[str, Any], conversation: list[dict]) -> str:
    blob = json.dumps({"identity": identity, "conversation": conversation}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class ReplyCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.replies: dict[str, tuple[str, str]] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the torn tail of an interrupted write
                self.replies[entry["key"]] = (entry["text"], entry.get("finish", "stop"))
        self.reused = 0

    def answer(self, keys: Sequence[str], conversations: Sequence[list[dict]], fetch: Callable[[list[list[dict]]], list[tuple[str, str]]],
               batch_size: int, on_progress: Callable[[int], None] | None = None) -> list[tuple[str, str]]:
        """The reply to every conversation: from the cache, else from ``fetch`` (``batch_size`` at a time, each batch
        appended to the file before the next starts)."""
        todo = [i for i, k in enumerate(keys) if k not in self.replies]
        self.reused += len(keys) - len(todo)
        if on_progress is not None:
            on_progress(len(keys) - len(todo))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = self.path.is_file() and not self.path.read_bytes().endswith(b"\n") and self.path.stat().st_size > 0
        with self.path.open("a", encoding="utf-8") as journal:
            if torn:
                journal.write("\n")  # the next reply starts its own line, after the torn one
            for start in range(0, len(todo), batch_size):
                batch = todo[start: start + batch_size]
                replies = fetch([conversations[i] for i in batch])
                for i, (text, finish) in zip(batch, replies):
                    self.replies[keys[i]] = (text, finish)
                    journal.write(json.dumps({"key": keys[i], "text": text, "finish": finish}, ensure_ascii=False) + "\n")
                journal.flush()
                os.fsync(journal.fileno())
                if on_progress is not None:
                    on_progress(len(keys) - len(todo) + start + len(batch))
        return [self.replies[k] for k in keys]
