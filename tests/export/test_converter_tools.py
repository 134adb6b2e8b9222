"""Obtaining llama.cpp's converter scripts (from the llama-cpp-python sdist, cached) without the network: offline
it fails saying what to do, a damaged sdist is refused and removed, a good one is extracted (only the
converter's files) and reused; and a failed converter run is explained for people."""

from __future__ import annotations

import io
import subprocess
import tarfile

import pytest

import tunelab.export.converter as converter
from tunelab.errors import TunelabError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_sdist(path, version="9.9.9"):
    root = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    files = {"convert_hf_to_gguf.py": b"print('hf')\n", "convert_lora_to_gguf.py": b"", "conversion/__init__.py": b"",
             "gguf-py/gguf/__init__.py": b"", "ggml/src/big.c": b"not needed", "../../escape.py": b"no"}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(root + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_offline_without_a_cached_sdist_says_what_to_do(cache, monkeypatch):
    def no_network(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(converter.subprocess, "run", no_network)
    with pytest.raises(TunelabError, match=r"llama-cpp-python 9\.9\.9 source.*network unreachable.*pip download --no-deps "
                                           r"--no-binary :all: llama-cpp-python==9\.9\.9.*sdist.*--format hf"):
        converter.tools_dir("9.9.9")
    assert not [p for p in (cache / "sdist").iterdir()]  # no temporaries left


def test_a_cached_sdist_is_checked_extracted_once_and_reused(cache, monkeypatch):
    (cache / "sdist").mkdir(parents=True)
    sdist = cache / "sdist" / "llama_cpp_python-9.9.9.tar.gz"
    _fake_sdist(sdist)
    from tunelab.models.embedded import file_sha256

    monkeypatch.setitem(converter.PINNED_SDISTS, "9.9.9", "0" * 64)
    with pytest.raises(TunelabError, match="not the pinned"):
        converter.tools_dir("9.9.9")
    assert not sdist.exists()  # a damaged download is not kept
    _fake_sdist(sdist)
    monkeypatch.setitem(converter.PINNED_SDISTS, "9.9.9", file_sha256(sdist))
    tools = converter.tools_dir("9.9.9")
    assert (tools / "convert_hf_to_gguf.py").read_text() == "print('hf')\n"
    assert (tools / "gguf-py" / "gguf" / "__init__.py").is_file() and not (tools / "ggml").exists()
    assert not list(cache.rglob("escape.py"))
    sdist.unlink()
    assert converter.tools_dir("9.9.9") == tools  # cached: the sdist is not needed again


def test_quant_names_are_case_insensitive():
    assert converter.canonical_quant("Q4_K_M") == "q4_K_M" and converter.canonical_quant("F16") == "f16"
    assert converter.canonical_quant("q2_k") is None


@pytest.mark.parametrize("log, said", [
    ("ERROR:hf-to-gguf:Model OPTForCausalLM is not supported\n", r"does not support the architecture OPTForCausalLM"),
    ("Traceback ...\nModuleNotFoundError: No module named 'sentencepiece'\n", r"needs the Python package 'sentencepiece'.*tunelab\[export\]"),
    ("NotImplementedError: BPE pre-tokenizer was not recognized - update get_vocab_base_pre()\n", r"pre-tokenizer.*--format hf"),
])
def test_converter_failures_are_explained(log, said):
    assert pytest.importorskip("re").search(said, converter.explain_failure(log, "GGUF conversion"))
