"""Read user files without letting their content take the process's memory or time first.

Every YAML file tunelab reads (run configs, merge files, pipelines, a run's recorded ``config.yaml``) goes
through :func:`load` (or :func:`compose`, for line numbers): PyYAML's safe loader shares an aliased node
instead of copying it, but everything downstream (key line maps, validation, hashing, dumping) walks the
expanded tree, so a 1 KB "billion laughs" document becomes gigabytes there. The loader here counts, while
composing, how many values the aliases would add once expanded, and refuses past :data:`MAX_ALIAS_VALUES`,
as it refuses recursive aliases, nesting deeper than :data:`MAX_DEPTH` and documents over
:data:`MAX_YAML_BYTES`. PyYAML has no such limit and no maintained YAML library for Python offers one,
hence this small subclass.

:func:`open_regular` opens a path for reading only if it is a regular file (after following links), so a
data file linked to ``/dev/zero`` or a FIFO is refused instead of read forever or waited on.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import IO, Any

import yaml

from tunelab.errors import ConfigError

MAX_YAML_BYTES = 1 << 20
"""Largest YAML document accepted (configs, merge files and pipelines are a few KB)."""
MAX_ALIAS_VALUES = 100_000
"""Most values YAML aliases may add to a document once expanded."""
MAX_DEPTH = 100
"""Deepest nesting of mappings and sequences accepted."""


class UnreadableFileError(OSError):
    """A user file that must not be read: not a regular file, or larger than allowed. ``str()`` is the message."""

    def __init__(self, message: str, code: int = errno.EINVAL):
        super().__init__(code, message)

    def __str__(self) -> str:
        return str(self.strerror)


def open_regular(path: str | Path) -> IO[bytes]:
    """Open ``path`` for binary reading if it is a regular file (links followed), else refuse.

    The file is opened non-blocking (a FIFO neither blocks the open nor is read) and checked with ``fstat``
    on the opened descriptor, so a path swapped between a check and the open cannot slip through.

    Raises:
        UnreadableFileError: For a device, FIFO, socket or directory.
        OSError: If the file cannot be opened.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            link = f" (a link to {os.path.realpath(path)})" if os.path.islink(path) else ""
            raise UnreadableFileError(f"{path}{link} is {kind}, not a regular file; give the path of a file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | Path, limit: int) -> bytes:
    """The content of regular file ``path``, refused when longer than ``limit`` bytes (read no further)."""
    with open_regular(path) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise UnreadableFileError(f"{path} is larger than {_size(limit)}; is it the right file?", errno.EFBIG)
    return data


def read_text(path: str | Path, limit: int = MAX_YAML_BYTES) -> str:
    """:func:`read_bytes` decoded as UTF-8 (``UnicodeDecodeError`` if it is not)."""
    return read_bytes(path, limit).decode("utf-8")


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses alias bombs, recursive aliases and deep nesting while composing."""

    def __init__(self, text: str, source: str):
        super().__init__(text)
        self.source, self.depth, self.added = source, 0, 0
        self.sizes: dict[int, int] = {}  # id(node) -> values in the node once its aliases are expanded

    def refuse(self, mark: Any, message: str) -> ConfigError:
        line = f":{mark.line + 1}" if mark is not None else ""
        return ConfigError([f"{self.source}{line}: {message}"], source=self.source)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            node = super().compose_node(parent, index)
            size = self.sizes.get(id(node))
            if size is None:
                raise self.refuse(mark, "a YAML alias refers to a node it is inside (a recursive structure); "
                                        "write the value out instead")
            self.added += size
            if self.added > MAX_ALIAS_VALUES:
                raise self.refuse(mark, f"too many YAML aliases: expanded, they would add more than "
                                        f"{MAX_ALIAS_VALUES:,} values; write the values out or use fewer aliases")
            return node
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise self.refuse(self.peek_event().start_mark, f"YAML nested more than {MAX_DEPTH} levels deep; "
                                                                "flatten the document")
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        self.sizes[id(node)] = 1 + _children_size(node, self.sizes)
        return node


def _children_size(node: Any, sizes: dict[int, int]) -> int:
    if isinstance(node, yaml.MappingNode):
        return sum(sizes[id(key)] + sizes[id(value)] for key, value in node.value)
    if isinstance(node, yaml.SequenceNode):
        return sum(sizes[id(item)] for item in node.value)
    return 0


def _bounded(text: str, source: str, build: str) -> Any:
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError([f"{source}: the YAML document is larger than {_size(MAX_YAML_BYTES)}; "
                           "is it the right file?"], source=source)
    loader = _BoundedLoader(text, source)
    try:
        return loader.get_single_node() if build == "node" else loader.get_single_data()
    finally:
        loader.dispose()


def load(text: str, source: str = "config") -> Any:
    """``yaml.safe_load`` of ``text``, bounded (see the module docstring).

    Args:
        text: The YAML document.
        source: The file name (or another label) that starts each error message.

    Raises:
        yaml.YAMLError: If the text is not valid YAML (callers word that error themselves).
        ConfigError: ``source:line: ...`` for too many aliases, recursive aliases, deep nesting or a too large
            document.
    """
    return _bounded(text, source, "data")


def compose(text: str, source: str = "config") -> Any:
    """``yaml.compose`` of ``text`` (the node tree, with line marks), bounded like :func:`load`."""
    return _bounded(text, source, "node")


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 and not limit % (1 << 20) else f"{limit:,} bytes"
