"""Read data files into raw records, reporting every unreadable part instead of stopping at the first.

Each reader returns the records it could parse, each paired with a location string for error messages
(``"path:line"`` for line-based text files, ``"path:record N"`` for formats without meaningful lines),
plus a list of ``"location: reason"`` problems. Nothing here knows about instruction formats; that is
:mod:`tunelab.data.records`' job.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tunelab.safeyaml import UnreadableFileError, open_regular

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_LINE_BYTES = 16 << 20
"""Longest JSONL line read; a longer one is reported, and skipped in bounded chunks, never held whole."""
_BOM = b"\xef\xbb\xbf"
_UTF8_HINT = "re-save the file as UTF-8"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class RawFile:
    """The parsed records of one file and the problems met while reading it."""

    path: str
    records: list[tuple[int, str, Any]] = field(default_factory=list)
    """``(position, location, value)``; position is the line or record number, for ordering."""
    problems: list[tuple[int, str]] = field(default_factory=list)
    """``(position, "location: reason")``; position 0 is the whole file."""

    def bad(self, position: int, message: str) -> None:
        """Record a problem at a line or record number (0 for the whole file)."""
        self.problems.append((position, message))


def read_file(path: str) -> RawFile:
    """Read one data file (or saved HF dataset directory) into raw records.

    Args:
        path: A ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file, or a ``datasets.save_to_disk`` folder.

    Returns:
        The records with their locations and every problem found; never raises for bad data.
    """
    raw = RawFile(path)
    p = Path(path)
    if not p.exists():
        raw.bad(0, f"{path}: file not found; check the path in data.train / data.eval")
        return raw
    if p.is_dir():
        _read_hf_dataset(raw)
        return raw
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raw.bad(
            0,
            f"{path}: unknown file type {p.suffix or '(no extension)'!r}; use .jsonl, .json, .csv, .parquet "
            "or a folder written by datasets.save_to_disk"
        )
        return raw
    try:
        # Only regular files: a link to /dev/zero would be read forever, a FIFO waited on.
        with open_regular(p) as stream:
            if suffix in (".jsonl", ".parquet"):
                (_read_jsonl if suffix == ".jsonl" else _read_parquet)(raw, stream)
                return raw
            data = stream.read()
    except UnreadableFileError as e:
        raw.bad(0, f"{e} (check data.train / data.eval)")
        return raw
    except OSError as e:
        raw.bad(0, f"{path}: cannot read the file: {e.strerror or e}")
        return raw
    text = _decode_whole(raw, data)
    if text is not None:
        (_read_json if suffix == ".json" else _read_csv)(raw, text)
    return raw


class JsonValueError(ValueError):
    """JSON that parses (or would, without Python's limits) into a value tunelab cannot use; ``str()`` says why."""


def parse_json(text: str, *, surrogates: bool = True) -> Any:
    """``json.loads``, turning what it crashes on or lets through unusable into :class:`JsonValueError`.

    Raises:
        json.JSONDecodeError: If ``text`` is not JSON.
        JsonValueError: For nesting deeper than Python's recursion allows, an integer longer than Python's
            ``int`` digit limit, or a lone UTF-16 surrogate (``"\\ud800"``: valid JSON, not a character, so
            it fails later when the text is encoded), unless ``surrogates`` is False (the caller checks).
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise JsonValueError("the value is nested too deeply to read (past Python's recursion limit); flatten it") from None
    except ValueError as e:
        if "digits" in str(e):
            raise JsonValueError(f"the value has an integer with more than {sys.get_int_max_str_digits():,} digits; "
                                 "write it as a string") from None
        raise JsonValueError(str(e)) from None
    if surrogates and _SURROGATE_ESCAPE.search(text) and surrogate_in(value):
        raise JsonValueError(_SURROGATE_MESSAGE)
    return value


_SURROGATE_MESSAGE = ("the value contains a lone UTF-16 surrogate (an escape like \\ud800 that is half of a character); "
                      "fix the escape or remove it")


def surrogate_in(value: Any) -> bool:
    """Whether a string (a key or a value) anywhere in the parsed JSON ``value`` holds a surrogate code point."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _decode_whole(raw: RawFile, data: bytes) -> str | None:
    """Decode a whole file as UTF-8, naming the line of the first bad byte on failure."""
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raw.bad(line, f"{raw.path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); {_UTF8_HINT}")
        return None


def _lines(raw: RawFile, stream: IO[bytes]) -> Any:
    """``(number, line)`` of a binary stream, each read with a bounded ``readline``; an over-long line is
    reported and skipped in chunks, so memory stays within :data:`MAX_LINE_BYTES`."""
    limit = MAX_LINE_BYTES
    number = 0
    while line := stream.readline(limit + 1):
        number += 1
        if number == 1 and line.startswith(_BOM):
            line = line[len(_BOM) :]
        if len(line) > limit and not line.endswith(b"\n"):
            raw.bad(number, f"{raw.path}:{number}: line longer than {limit:,} bytes; split the record or check the file")
            while (rest := stream.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            continue
        yield number, line.rstrip(b"\n")


def _read_jsonl(raw: RawFile, stream: IO[bytes]) -> None:
    """One JSON value per line; blank lines are skipped; each line is decoded on its own."""
    for number, line in _lines(raw, stream):
        if not line.strip():
            continue
        where = f"{raw.path}:{number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raw.bad(
                number,
                f"{where}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); {_UTF8_HINT}"
            )
            continue
        try:
            raw.records.append((number, where, parse_json(text)))
        except json.JSONDecodeError as e:
            raw.bad(number, f"{where}: invalid JSON: {e}")
        except JsonValueError as e:
            raw.bad(number, f"{where}: {e}")


def _read_json(raw: RawFile, text: str) -> None:
    """A JSON array of records, or an object whose single value is that array."""
    try:
        value = parse_json(text, surrogates=False)  # reported by record, below
    except json.JSONDecodeError as e:
        raw.bad(e.lineno, f"{raw.path}:{e.lineno}: invalid JSON: {e}")
        return
    except JsonValueError as e:
        raw.bad(0, f"{raw.path}: {e}")
        return
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(value) == 1 and lists:
            value = lists[0]
        else:
            raw.bad(
                1,
                f"{raw.path}:1: expected a JSON array of records or an object with a single list value, "
                f"got an object with keys {sorted(value)}; for one record per line use .jsonl"
            )
            return
    if not isinstance(value, list):
        raw.bad(1, f"{raw.path}:1: expected a JSON array of records, got {describe_type(value)}")
        return
    for i, rec in enumerate(value, start=1):
        if surrogate_in(rec):
            raw.bad(i, f"{raw.path}:record {i}: {_SURROGATE_MESSAGE}")
        else:
            raw.records.append((i, f"{raw.path}:record {i}", rec))


def _read_csv(raw: RawFile, text: str) -> None:
    """A header row then one record per row; a row's location is the line where it starts."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        previous_end = reader.line_num
        for row in reader:
            # Quoted fields may span lines, so the row starts just after where the previous one ended.
            start, previous_end = previous_end + 1, reader.line_num
            if not row:
                continue
            where = f"{raw.path}:{start}"
            if len(row) != len(header):
                raw.bad(
                    start,
                    f"{where}: row has {len(row)} fields but the header has {len(header)}; "
                    "quote fields that contain commas or newlines"
                )
                continue
            raw.records.append((start, where, dict(zip(header, row))))
    except csv.Error as e:
        raw.bad(reader.line_num, f"{raw.path}:{reader.line_num}: invalid CSV: {e}")


def _read_parquet(raw: RawFile, stream: IO[bytes]) -> None:
    """Rows of a parquet file, as plain Python values (nulls become None)."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(stream).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raw.bad(0, f"{raw.path}: not a readable parquet file: {e}")
        return
    raw.records.extend((i, f"{raw.path}:record {i}", row) for i, row in enumerate(rows, start=1))


def _read_hf_dataset(raw: RawFile) -> None:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    import datasets

    try:
        ds = datasets.load_from_disk(raw.path)
    except Exception as e:  # datasets raises FileNotFoundError or its own errors for foreign folders
        raw.bad(
            0,
            f"{raw.path}: is a folder but not a saved Hugging Face dataset ({e}); "
            "point data.train at a file or a folder written by datasets.save_to_disk"
        )
        return
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if "train" in ds:
            ds = ds["train"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raw.bad(
                0,
                f"{raw.path}: dataset has splits {splits} and none is 'train'; save the split to use on its own"
            )
            return
    raw.records.extend((i, f"{raw.path}:record {i}", row) for i, row in enumerate(ds.to_list(), start=1))


def describe_type(value: Any) -> str:
    """A JSON-ish name for a Python value's type, for error messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    if type(value) in names:
        return names[type(value)]
    return "a number" if isinstance(value, (int, float)) else type(value).__name__
