"""Raw text for continued pre-training: read documents, cut them into token blocks with every token trained.

Sources: ``.txt`` and ``.md`` files (one document each), folders of them (recursively, in sorted order), and
JSONL / CSV / Parquet files with a text column (one document per record). Every unreadable file or bad
record is reported at once as ``file:line`` before anything loads, like the instruction data.

Blocks: each document is tokenized without special tokens, ends with the tokenizer's eos (so the model
learns where documents end), and is cut into pieces of at most ``block_size`` tokens. Pieces of different
documents are never joined into one sequence here; ``train.packing`` packs pieces into rows with attention
kept inside each piece (``tunelab.data.packing``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunelab.data.tokenize import TokenizedExample
from tunelab.errors import DataError

TEXT_SUFFIXES = (".txt", ".md")
TABLE_SUFFIXES = (".jsonl", ".csv", ".parquet")
# data.format fim: folders also give their source files (one document each)
CODE_SUFFIXES = TEXT_SUFFIXES + (".py", ".js", ".jsx", ".ts", ".tsx", ".java", ".kt", ".scala", ".c", ".h", ".cc", ".cpp", ".hpp",
                                 ".cs", ".go", ".rs", ".rb", ".php", ".swift", ".lua", ".r", ".jl", ".sh", ".sql", ".html", ".css",
                                 ".json", ".yaml", ".yml", ".toml")


@dataclass(frozen=True)
class TextDocument:
    text: str
    source: str  # "path" or "path:line"


def text_files(paths: list[str], code: bool = False) -> list[Path]:
    """The files behind ``paths``: files as given, folders expanded to their .txt/.md files (with ``code``, also
    their source files: ``CODE_SUFFIXES``), sorted."""
    suffixes = CODE_SUFFIXES if code else TEXT_SUFFIXES
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        else:
            files.append(path)
    return files


def read_texts(paths: list[str], *, text_field: str = "text", code: bool = False) -> list[TextDocument]:
    """Every document under ``paths`` (with ``code``, source files too); raises DataError listing every problem
    (missing files, bad records)."""
    documents: list[TextDocument] = []
    problems: list[str] = []
    files = text_files(paths, code)
    plain = CODE_SUFFIXES if code else TEXT_SUFFIXES
    for path in files:
        suffix = path.suffix.lower()
        if not path.is_file():
            problems.append(f"{path}: no such file or folder")
        elif suffix in plain:
            _read_plain(path, documents, problems)
        elif suffix in TABLE_SUFFIXES:
            _read_table(path, text_field, documents, problems)
        else:
            problems.append(f"{path}: unsupported file type {suffix or '(none)'}; use {', '.join(plain + TABLE_SUFFIXES)}")
    if not files:
        problems.append(f"{', '.join(paths)}: no {'source' if code else '.txt or .md'} files found")
    elif not documents and not problems:
        problems.append(f"{', '.join(paths)}: every document is empty")
    if problems:
        raise DataError(problems, what=", ".join(paths))
    return documents


def _read_plain(path: Path, documents: list[TextDocument], problems: list[str]) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{path}: cannot read as UTF-8 text ({exc})")
        return
    if text.strip():
        documents.append(TextDocument(text, str(path)))


def _read_table(path: Path, field: str, documents: list[TextDocument], problems: list[str]) -> None:
    """One document per record of a JSONL/CSV/Parquet file; line numbers are the file's (1-based, CSV header = 1)."""
    try:
        if path.suffix.lower() == ".jsonl":
            rows = _jsonl_rows(path, problems)
        else:
            import pandas as pd

            from tunelab.safeyaml import open_regular

            open_regular(path).close()  # a FIFO or a device is refused before pandas blocks or reads without end
            frame = pd.read_csv(path, dtype=str, keep_default_na=False) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
            first = 2 if path.suffix.lower() == ".csv" else 1
            rows = [(first + i, record) for i, record in enumerate(frame.to_dict("records"))]
    except (OSError, ValueError, ImportError) as exc:
        problems.append(f"{path}: cannot read ({exc})")
        return
    for line, record in rows:
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            problems.append(f"{path}:{line}: no text in field {field!r} (set recipe.text_field to the column holding the text)")
        elif value.strip():
            documents.append(TextDocument(value, f"{path}:{line}"))


def _jsonl_rows(path: Path, problems: list[str]) -> list[tuple[int, dict]]:
    """The records of a JSONL file through the data reader (bounded lines, regular files only, checked values)."""
    from tunelab.data.readers import read_file

    raw = read_file(str(path))
    problems.extend(message for _, message in raw.problems)
    return [(number, value) for number, _, value in raw.records]


def text_blocks(documents: list[TextDocument], tokenizer, block_size: int) -> list[TokenizedExample]:
    """Each document's tokens plus eos, cut into pieces of at most ``block_size`` tokens, every token trained."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = tokenizer([d.text for d in documents], add_special_tokens=False)["input_ids"]
    blocks: list[TokenizedExample] = []
    for document, ids in zip(documents, encoded):
        ids = list(ids) + eos
        for index, start in enumerate(range(0, len(ids), block_size)):
            piece = ids[start : start + block_size]
            if len(piece) > 1:  # one token has no next token to predict
                blocks.append(TokenizedExample(piece, list(piece), f"{document.source}#block{index}"))
    return blocks


def split_holdout(blocks: list[TokenizedExample], share: float) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """(train, held out): every k-th block held out so that about ``share`` of them are, spread over all documents."""
    if share <= 0 or len(blocks) < 2:
        return blocks, []
    every = max(2, round(1 / share))
    held = [b for i, b in enumerate(blocks) if i % every == every - 1]
    return [b for i, b in enumerate(blocks) if i % every != every - 1], held
