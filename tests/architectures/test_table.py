"""docs/architectures.md is the matrix's own data rendered (``table.py``), never typed by hand."""

from architectures.table import DOC, render


def test_the_committed_table_is_the_matrix_data():
    assert DOC.read_text(encoding="utf-8") == render(), "run: python tests/architectures/table.py"
