"""Read a folder of documents as plain text: ``.txt``, ``.md``, ``.html`` / ``.htm`` and ``.pdf``.

Text and Markdown are read as they are (UTF-8). HTML goes through the standard library's
``html.parser`` (maintained with Python, no dependency): the text of the page without ``script``,
``style``, ``head`` and ``template`` elements, with block elements (paragraphs, headings, list items,
table rows, ``br``) ending a line so the chunker sees paragraphs. PDF text is extracted with ``pypdf``
(the ``synth`` extra), page by page, pages separated by a blank line; a PDF whose pages hold no text (a
scan) is refused with what to do, since OCR is out of scope.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from tunelab.errors import TunelabError

SUFFIXES = (".txt", ".md", ".html", ".htm", ".pdf")
_SKIPPED = {"script", "style", "head", "template", "noscript"}
_BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre", "blockquote",
           "table", "ul", "ol", "header", "footer", "title"}


@dataclass(frozen=True)
class Document:
    """A document's text and its name relative to the folder it was read from (``"returns.txt"``)."""

    name: str
    text: str


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIPPED:
            self.skipping += 1
        elif tag in _BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in _SKIPPED:
            self.skipping = max(0, self.skipping - 1)
        elif tag in _BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_text(markup: str) -> str:
    """The visible text of an HTML page, one paragraph per block element."""
    parser = _Text()
    parser.feed(markup)
    parser.close()
    return tidy("".join(parser.parts))


def tidy(text: str) -> str:
    """Runs of spaces made one, at most one blank line between paragraphs, no trailing spaces."""
    lines = [re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def pdf_text(path: Path) -> str:
    """The text of every page of a PDF, pages separated by a blank line.

    Raises:
        TunelabError: pypdf is missing (names the extra), or the file is not a readable PDF.
    """
    try:
        from pypdf import PdfReader
        from pypdf.errors import PyPdfError
    except ImportError:
        raise TunelabError(f"{path}: reading PDF needs pypdf; install it with: pip install 'tunelab[synth]'") from None
    try:
        pages = [page.extract_text() or "" for page in PdfReader(path).pages]
    except (PyPdfError, ValueError, OSError) as error:
        raise TunelabError(f"{path}: not a readable PDF ({error}); re-save it or remove it from the folder") from None
    return tidy("\n\n".join(pages))


def read_document(path: Path, name: str) -> Document:
    """One file as a :class:`Document` (its reader chosen by suffix).

    Raises:
        TunelabError: The file is not UTF-8 text, cannot be read, or is a PDF without text.
    """
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        text = pdf_text(path)
        if not text:
            raise TunelabError(f"{path}: the PDF holds no text (a scanned image?); run OCR on it first or remove it")
        return Document(name, text)
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise TunelabError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); convert it to UTF-8 or remove it") from None
    except OSError as error:
        raise TunelabError(f"{path}: cannot be read ({error.strerror or error})") from None
    return Document(name, html_text(raw) if suffix in (".html", ".htm") else tidy(raw))


def read_documents(folder: str | Path) -> list[Document]:
    """Every document under ``folder`` (recursively, in sorted path order); empty files are left out.

    Raises:
        TunelabError: The folder is missing or holds no document with text, or a file cannot be read.
    """
    root = Path(folder)
    if not root.is_dir():
        raise TunelabError(f"{folder}: not a folder; point DOCS_DIR at a folder of {', '.join(SUFFIXES)} files")
    paths = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES),
                   key=lambda p: p.relative_to(root).as_posix())
    documents = [read_document(p, p.relative_to(root).as_posix()) for p in paths]
    documents = [d for d in documents if d.text]
    if not documents:
        raise TunelabError(f"{folder}: holds no {', '.join(SUFFIXES)} file with text; add the documents to learn from")
    return documents
