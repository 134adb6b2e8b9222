"""Recording fsyncs and renames, for the durability tests of atomic writes and checkpoints."""

from __future__ import annotations

import os


def record_io(monkeypatch) -> list[tuple]:
    """Record each fsync (as the (device, inode) it flushed) and each rename, in order."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", (st.st_dev, st.st_ino)))
        real_fsync(fd)

    def replace(src, dst, **kwargs):
        real_replace(src, dst, **kwargs)
        events.append(("replace", os.fspath(src), os.fspath(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def inode(path) -> tuple:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def position(events: list[tuple], event: tuple) -> int:
    assert event in events, f"{event} not in {events}"
    return events.index(event)


def publish_index(events: list[tuple], target) -> int:
    """Index of the rename that put ``target`` in place."""
    return max(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == os.fspath(target))
