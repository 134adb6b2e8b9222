"""Instruction data: load and validate files, apply chat templates, tokenize with loss masks, batch."""

from tunelab.data.collate import collate
from tunelab.data.inspect import inspect_report
from tunelab.data.records import FORMATS, ROLES, Example, data_fingerprint, load_examples
from tunelab.data.templates import CHATML_TEMPLATE, NAMED_TEMPLATES, prepare_tokenizer, turn_markers
from tunelab.data.tokenize import (
    IGNORE_INDEX,
    TokenizedExample,
    TokenizeStats,
    render_example,
    tokenize_examples,
)

__all__ = [
    "CHATML_TEMPLATE",
    "FORMATS",
    "IGNORE_INDEX",
    "NAMED_TEMPLATES",
    "ROLES",
    "Example",
    "TokenizeStats",
    "TokenizedExample",
    "collate",
    "data_fingerprint",
    "inspect_report",
    "load_examples",
    "prepare_tokenizer",
    "render_example",
    "tokenize_examples",
    "turn_markers",
]
