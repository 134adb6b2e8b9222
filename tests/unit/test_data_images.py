"""Chat records with image parts: kept in the message, resolved beside the JSONL, checked with Pillow by file:line."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from tunelab.data import load_examples
from tunelab.data.images import image_references, load_image, vision_problems
from tunelab.errors import DataError


def _png(path: Path, colour=(255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def _write(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _record(*parts, answer="red") -> dict:
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "What colour?"}]},
                         {"role": "assistant", "content": answer}]}


def test_image_parts_are_kept_and_resolved_beside_the_file(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png", (0, 0, 255))
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (0, 255, 0)).save(buf, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    record = _record({"type": "image", "path": "img/a.png"},
                     {"type": "image_url", "image_url": {"url": f"file://{tmp_path / 'img' / 'b.png'}"}},
                     {"type": "image_url", "image_url": {"url": data_url}})
    [ex] = load_examples([_write(tmp_path / "d.jsonl", [record])])
    refs = image_references(ex.messages)
    assert refs[:2] == [str(tmp_path / "img" / "a.png"), str(tmp_path / "img" / "b.png")]
    assert load_image(refs[2]).getpixel((0, 0)) == (0, 255, 0)
    assert ex.messages[0]["content"][-1] == {"type": "text", "text": "What colour?"}
    assert ex.messages[1]["content"] == "red"


def test_text_only_lists_still_join(tmp_path):
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                           {"role": "assistant", "content": "c"}]}
    [ex] = load_examples([_write(tmp_path / "d.jsonl", [record])])
    assert ex.messages[0]["content"] == "ab"


def test_broken_images_reported_by_line(tmp_path):
    _png(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    records = [_record({"type": "image", "path": "ok.png"}), _record({"type": "image", "path": "missing.png"}),
               _record({"type": "image", "path": "bad.png"}),
               _record({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}),
               {"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": [{"type": "image", "path": "ok.png"}, {"type": "text", "text": "x"}]}]}]
    with pytest.raises(DataError) as err:
        load_examples([_write(tmp_path / "d.jsonl", records)])
    problems = err.value.problems
    assert len(problems) == 4
    assert ":2:" in problems[0] and "missing.png not found" in problems[0]
    assert ":3:" in problems[1] and "not an image Pillow can read" in problems[1]
    assert ":4:" in problems[2] and "base64" in problems[2]
    assert ":5:" in problems[3] and "images go in user messages" in problems[3]


def test_images_for_a_text_model_are_refused(tmp_path):
    _png(tmp_path / "ok.png")
    examples = load_examples([_write(tmp_path / "d.jsonl", [_record({"type": "image", "path": "ok.png"})] * 2)])
    problems = vision_problems(examples, vision=False, model="tiny-llama")
    assert len(problems) == 2 and "no vision tower" in problems[0] and "d.jsonl:1" in problems[0]
    assert vision_problems(examples, vision=True, model="m", max_images=0)[0].endswith("this model's template takes")
