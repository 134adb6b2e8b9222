"""Generate the shapes task: one coloured figure per image; the question asks its colour or its shape.

The question alone says only which of the two is asked, so a model that cannot see the pixels is right at
most one time in three (three colours, three shapes): what a tiny VLM gets above that it read from the image.
``blank=True`` writes the same records with uniformly grey images, the control of the pixel-learning bench.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {"colour": "What colour is the shape? Answer in one word.",
             "shape": "What shape is it? Answer in one word."}


def draw(colour: str, shape: str, size: int, rng: random.Random):
    """A white ``size`` square image with one figure of ``colour`` and ``shape`` at a random place and scale."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (255, 255, 255))
    pen = ImageDraw.Draw(img)
    side = rng.randint(size // 2, size - 8)
    x, y = rng.randint(2, size - side - 2), rng.randint(2, size - side - 2)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse((x, y, x + side, y + side), fill=fill)
    elif shape == "square":
        pen.rectangle((x + side // 6, y + side // 6, x + side - side // 6, y + side - side // 6), fill=fill)
    else:
        pen.polygon([(x + side // 2, y), (x, y + side), (x + side, y + side)], fill=fill)
    return img


def generate(directory: str | Path, *, train: int = 240, test: int = 60, size: int = 56, seed: int = 0,
             blank: bool = False) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` with their images under ``directory/img``.

    Returns:
        The two JSONL paths.
    """
    from PIL import Image

    directory = Path(directory)
    (directory / "img").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for split, count in (("train", train), ("test", test)):
        lines = []
        for i in range(count):
            colour, shape, asked = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(QUESTIONS))
            img = draw(colour, shape, size, rng)
            name = f"img/{split}_{i}.png"
            (Image.new("RGB", img.size, (128, 128, 128)) if blank else img).save(directory / name)
            answer = colour if asked == "colour" else shape
            lines.append({"messages": [
                {"role": "user", "content": [{"type": "image", "path": name}, {"type": "text", "text": QUESTIONS[asked]}]},
                {"role": "assistant", "content": answer}]})
        path = directory / f"{split}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]
