"""Reading documents (txt, md, html, pdf) and cutting them into token chunks grouped into contexts."""

from __future__ import annotations

import pytest

from tunelab.errors import TunelabError
from tunelab.models.tiny import build_tiny_tokenizer
from tunelab.synth.chunks import chunk_document, group_contexts
from tunelab.synth.documents import Document, html_text, read_documents


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing ``text`` in Helvetica (objects and cross-reference table written out by hand)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1) + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_every_format_reads_as_plain_text(tmp_path):
    (tmp_path / "a.txt").write_text("Plain   text.\r\n\r\n\r\n\r\nSecond paragraph.  ", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# Title\n\nBody.", encoding="utf-8")
    (tmp_path / "c.html").write_text("<html><head><title>T</title><style>p{}</style></head><body><script>var x=1;</script>"
                                     "<h1>Heading</h1><p>One &amp; two.</p><ul><li>first</li><li>second</li></ul></body></html>")
    (tmp_path / "d.pdf").write_bytes(minimal_pdf("Refunds take five days."))
    (tmp_path / "ignored.jsonl").write_text("{}")
    docs = {d.name: d.text for d in read_documents(tmp_path)}
    assert list(docs) == ["a.txt", "c.html", "d.pdf", "sub/b.md"]
    assert docs["a.txt"] == "Plain text.\n\nSecond paragraph."
    assert docs["c.html"] == "Heading\n\nOne & two.\n\nfirst\n\nsecond"
    assert "var x" not in docs["c.html"] and "p{}" not in docs["c.html"]
    assert docs["d.pdf"] == "Refunds take five days."
    assert docs["sub/b.md"] == "# Title\n\nBody."


def test_unreadable_documents_are_named(tmp_path):
    with pytest.raises(TunelabError, match="not a folder"):
        read_documents(tmp_path / "missing")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(TunelabError, match="holds no .txt"):
        read_documents(tmp_path)
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(TunelabError, match=r"latin.txt: not UTF-8 text .* at byte 3"):
        read_documents(tmp_path)
    (tmp_path / "latin.txt").unlink()
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 nothing else")
    with pytest.raises(TunelabError, match="broken.pdf: not a readable PDF"):
        read_documents(tmp_path)


def test_html_block_elements_end_paragraphs():
    assert html_text("<div>a<br>b</div><p>c</p>") == "a\n\nb\n\nc"


TEXT = " ".join(f"Sentence number {i} says that item {i} costs {i * 3} pounds." for i in range(40))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_chunks_cover_the_document_within_the_token_budget(tokenizer):
    doc = Document("prices.txt", TEXT)
    chunks = chunk_document(doc, tokenizer, chunk_tokens=48, overlap=8)
    assert len(chunks) > 3
    for chunk in chunks:
        assert chunk.text == TEXT[chunk.start: chunk.end].strip()
        assert chunk.tokens <= 48
        assert len(tokenizer(chunk.text, add_special_tokens=False)["input_ids"]) <= 48 + 1
    assert chunks[0].start == 0 and chunks[-1].end == len(TEXT)
    for before, after in zip(chunks, chunks[1:]):
        assert after.start <= before.end, "a gap between chunks"
        assert before.start < after.start
    # chunks end at a sentence end when the window's second half has one
    assert all(c.text.endswith(".") for c in chunks)
    # the overlap starts at a sentence start
    assert all(c.text.startswith("Sentence") for c in chunks)


def test_chunk_settings_are_checked(tokenizer):
    with pytest.raises(TunelabError, match="overlap below half"):
        chunk_document(Document("a", TEXT), tokenizer, chunk_tokens=16, overlap=8)


def test_related_chunks_join_a_context_without_overlapping_its_anchor(tokenizer):
    docs = [Document("a.txt", "Refunds go to the original card within five days. " * 3),
            Document("b.txt", "Parcels ship from Tilbury on weekdays only."),
            Document("c.txt", "Card refunds of gift purchases go to store credit within five days.")]
    chunks = [c for d in docs for c in chunk_document(d, tokenizer, chunk_tokens=200, overlap=0)]
    contexts = group_contexts(chunks, related=1, max_tokens=1000)
    first = contexts[0]
    assert [c.document for c in first.chunks] == ["a.txt", "c.txt"]
    assert first.id == "a.txt#0+c.txt#0" and first.text.count("\n\n") == 1
    assert [s["document"] for s in first.spans()] == ["a.txt", "c.txt"]
    alone = group_contexts(chunks, related=1, max_tokens=1)  # the budget leaves only the anchors
    assert all(len(c.chunks) == 1 for c in alone)
    assert all(len(c.chunks) == 1 for c in group_contexts(chunks, related=0))
