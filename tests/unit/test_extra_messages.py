"""Error messages reach the terminal as written: rich markup must not eat bracketed text such as the
``tunelab[export]`` of an install hint (issue 37)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tunelab.clikit import friendly
from tunelab.errors import TunelabError

REPO = Path(__file__).resolve().parents[2]
EXTRAS = sorted(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"])
HINT = re.compile(r"pip install 'tunelab\[([a-z_,-]+)\]'")


def _hinted_extras() -> list[str]:
    """Every extra some message in src/ tells the user to install."""
    found = set()
    for path in (REPO / "src" / "tunelab").rglob("*.py"):
        found.update(HINT.findall(path.read_text(encoding="utf-8")))
    return sorted(found)


def _printed_error(message: str, capsys) -> str:
    @friendly
    def command() -> None:
        raise TunelabError(message)

    with pytest.raises(typer.Exit) as exit_info:
        command()
    assert exit_info.value.exit_code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("extra", sorted(set(EXTRAS) | set(_hinted_extras())))
def test_the_install_hint_of_every_extra_is_printed_whole(extra, capsys):
    message = f"this needs something optional; install it with: pip install 'tunelab[{extra}]'"
    printed = _printed_error(message, capsys)
    assert printed.strip() == f"error: {message}"


def test_bracketed_user_text_and_closing_tags_survive(capsys):
    message = "data.train [file] run[a]/x.jsonl:3: bad [/] tag [bold]not bold[/bold]"
    assert _printed_error(message, capsys).strip() == f"error: {message}"


def test_export_without_llama_cpp_names_the_export_extra(tiny_llama, tmp_path, monkeypatch):
    """The case seen in issue 37: `tunelab export` where llama-cpp-python is not installed."""
    from tunelab.cli import app

    monkeypatch.setattr("tunelab.export.llamacpp.llama_cpp_version", lambda: None)
    result = CliRunner().invoke(app, ["export", str(tiny_llama), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "pip install 'tunelab[export]'" in result.output
