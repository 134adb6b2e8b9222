"""``tunelab data synth`` on the embedded model (a minute on 2 CPU cores): the model behind a live ``tunelab serve``
on 127.0.0.1 is the generator, reached through the official openai client; the pairs pass tunelab's validation,
carry provenance that points back into the document, and a second run takes every reply from the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.data import load_examples

pytestmark = pytest.mark.slow
DOCS = Path(__file__).resolve().parents[2] / "src/tunelab/examples/shop_docs"


def test_an_endpoint_generator_makes_validated_pairs_with_provenance(tmp_path):
    from tunelab.serving.app import create_app
    from tunelab.serving.models import Registry
    from tunelab.serving.server import BackgroundServer

    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("returns.txt", "stores.md"):
        (docs / name).write_text((DOCS / name).read_text())
    out = tmp_path / "qa.jsonl"
    args = ["data", "synth", str(docs), "--out", str(out), "--chunk-tokens", "48", "--overlap", "8", "--question-rounds", "2"]
    with BackgroundServer(create_app(Registry("smollm2-135m-instruct", base_id="smollm2"))) as url:
        first = CliRunner().invoke(app, [*args, "--generator", f"{url}/v1"])
        assert first.exit_code == 0, first.output
        summary = json.loads((tmp_path / "qa.synth.json").read_text())
        assert summary["generator"] == {"kind": "endpoint", "url": f"{url}/v1", "model": "smollm2"}
        assert summary["kept"] >= 3 and summary["replies_from_cache"] == 0
        again = CliRunner().invoke(app, [*args, "--generator", f"{url}/v1"])
        assert again.exit_code == 0, again.output
        cached = json.loads((tmp_path / "qa.synth.json").read_text())
        requests = sum(1 for _ in (tmp_path / "qa.cache.jsonl").open())
        assert cached["replies_from_cache"] == requests and cached["kept"] == summary["kept"]
    examples = load_examples([str(out)])
    assert len(examples) == summary["train"]
    for example, line in zip(examples, (tmp_path / "qa.provenance.jsonl").read_text().splitlines()):
        provenance = json.loads(line)
        assert example.messages[0]["content"].endswith("?")
        span = provenance["spans"][0]
        text = (docs / span["document"]).read_text()
        assert 0 <= span["start"] < span["end"] <= len(text)
        assert provenance["scores"]["support"] >= 0.6 and provenance["scores"]["grounding"] >= 0.5
