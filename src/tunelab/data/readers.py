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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_BOM = b"\xef\xbb\xbf"
_UTF8_HINT = "re-save the file as UTF-8"


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
    if suffix == ".parquet":
        _read_parquet(raw)
        return raw
    try:
        data = p.read_bytes()
    except OSError as e:
        raw.bad(0, f"{path}: cannot read the file: {e.strerror or e}")
        return raw
    if suffix == ".jsonl":
        _read_jsonl(raw, data)
    else:
        text = _decode_whole(raw, data)
        if text is not None:
            (_read_json if suffix == ".json" else _read_csv)(raw, text)
    return raw


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


def _read_jsonl(raw: RawFile, data: bytes) -> None:
    """One JSON value per line; blank lines are skipped; each line is decoded on its own."""
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    for number, line in enumerate(data.split(b"\n"), start=1):
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
            raw.records.append((number, where, json.loads(text)))
        except json.JSONDecodeError as e:
            raw.bad(number, f"{where}: invalid JSON: {e}")


def _read_json(raw: RawFile, text: str) -> None:
    """A JSON array of records, or an object whose single value is that array."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raw.bad(e.lineno, f"{raw.path}:{e.lineno}: invalid JSON: {e}")
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
    raw.records.extend((i, f"{raw.path}:record {i}", rec) for i, rec in enumerate(value, start=1))


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


def _read_parquet(raw: RawFile) -> None:
    """Rows of a parquet file, as plain Python values (nulls become None)."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(raw.path).to_pylist()
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
