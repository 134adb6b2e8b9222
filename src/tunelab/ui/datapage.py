"""The dashboard's data page: validate an instruction-data file and see an example as the model sees it.

The file is read by tunelab's own loader (``data.load_examples``: every bad record with its ``file:line``) and
tokenized with a model's tokenizer and chat template (``data.tokenize_examples``, as training does), so the
trained tokens shown are the loss mask training would use. Only files inside the working directory or the
dashboard's folders can be read. This page imports transformers on first use (not the run pages).
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from tunelab.errors import DataError, TunelabError
from tunelab.ui.pages import page


def allowed(path: str, roots: tuple[Path, ...]) -> Path:
    """``path`` resolved, if it is a file inside the working directory or a root; else a TunelabError."""
    resolved = Path(path).resolve()
    places = (Path.cwd().resolve(), *roots)
    if not any(resolved == p or p in resolved.parents for p in places):
        raise TunelabError(f"{path}: outside the working directory and the dashboard's folders")
    if not resolved.is_file():
        raise TunelabError(f"{path}: no such file")
    return resolved


def inspect_file(path: str, roots: tuple[Path, ...], model: str, example: int = 0, loss_on: str = "assistant",
                 max_length: int = 1024) -> dict:
    """``{"problems": [...]}`` for a file with bad records, else its statistics and one example's tokens with
    ``trained`` marks."""
    from tunelab.data import load_examples, tokenize_examples
    from tunelab.data.templates import prepare_tokenizer
    from tunelab.models.load import load_tokenizer, resolve_model_path

    file = allowed(path, roots)
    try:
        examples = load_examples([str(file)])
    except DataError as error:
        return {"problems": error.problems}
    tokenizer = load_tokenizer(resolve_model_path(model))
    prepare_tokenizer(tokenizer, "auto")
    tokenized, stats = tokenize_examples(examples, tokenizer, loss_on=loss_on, max_length=max_length)
    if not tokenized:
        return {"problems": [f"{path}: no example keeps a trained token at max_length {max_length}"]}
    shown = tokenized[min(max(example, 0), len(tokenized) - 1)]
    pieces = [{"text": tokenizer.decode([t]), "trained": label != -100} for t, label in zip(shown.input_ids, shown.labels)]
    return {"stats": {"examples": stats.examples, "tokens": stats.tokens, "trained_tokens": stats.trained_tokens,
                      "truncated": stats.truncated, "dropped": len(stats.dropped), "max_len": stats.max_len,
                      "mean_len": round(stats.mean_len, 1)}, "source": shown.source, "tokens": pieces}


def data_page(models: list[str]) -> str:
    options = "".join(f"<option>{escape(m)}</option>" for m in models)
    body = ("<h1>Data</h1><p>Validate a data file and see one example as training tokenizes it: "
            "<mark>highlighted</mark> tokens are trained (the loss mask).</p><form id=\"data\" onsubmit=\"return false\">"
            "<p><label>file <input id=\"data-path\" size=\"60\" placeholder=\"src/tunelab/examples/sql/train.jsonl\"></label> "
            f"<label>tokenizer of <select id=\"data-model\">{options}</select></label> "
            "<label>example <input id=\"data-example\" type=\"number\" value=\"0\" min=\"0\" style=\"width:5em\"></label> "
            "<button id=\"inspect\" type=\"button\">Inspect</button></p></form>"
            "<div id=\"data-result\"></div>")
    return page("Data", body)
