"""Image parts of chat records: parsing, resolving and checking them with Pillow before anything trains.

A user message's content may mix text parts with image parts, in tunelab's shape
``{"type": "image", "path": "img/1.png"}`` or OpenAI's ``{"type": "image_url", "image_url": {"url": ...}}``
where the url is ``file://...``, ``data:image/...;base64,...`` or a plain path. Relative paths are relative
to the data file. Every part becomes ``{"type": "image", "image": <absolute path or data URL>}``: the shape
transformers' multimodal chat templates test for, so a processor renders the placeholders itself.

Why hand-written: transformers' processors load images lazily at render time and fail on the first bad one
with a traceback; a data file must instead be checked in full up front, each problem with its file:line.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

from tunelab.data.readers import describe_type

IMAGE_TYPES = ("image", "image_url")
IMAGE_KEY = "image"  # the key a normalised part keeps its reference under
_DATA_PREFIX = "data:image/"


def is_image_part(part: Any) -> bool:
    """Whether a content part is an image part (of either accepted shape)."""
    return isinstance(part, dict) and part.get("type") in IMAGE_TYPES


def part_reference(part: dict) -> str | None:
    """The raw reference of an image part (path, file:// or data: URL), or None if it has none."""
    if part.get("type") == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        return url if isinstance(url, str) and url else None
    for key in ("path", IMAGE_KEY, "url"):
        if isinstance(part.get(key), str) and part[key]:
            return part[key]
    return None


def has_images(messages) -> bool:
    """Whether any message of a conversation holds an image part."""
    return any(isinstance(m.get("content"), list) and any(is_image_part(p) for p in m["content"]) for m in messages)


def image_references(messages) -> list[str]:
    """The conversation's image references in reading order (normalised parts)."""
    return [p[IMAGE_KEY] for m in messages if isinstance(m.get("content"), list)
            for p in m["content"] if is_image_part(p)]


def resolve_reference(reference: str, base_dir: Path) -> str:
    """A data: URL unchanged; a ``file://`` URL or path made absolute (relative to ``base_dir``)."""
    if reference.startswith(_DATA_PREFIX):
        return reference
    if reference.startswith("file://"):
        reference = reference[len("file://"):]
    path = Path(reference).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def _image_bytes(reference: str) -> bytes:
    """The encoded image a resolved reference points at; raises ValueError/OSError saying why it cannot."""
    if reference.startswith(_DATA_PREFIX):
        header, _, payload = reference.partition(",")
        if not header.endswith(";base64"):
            raise ValueError("a data: URL must be base64 (data:image/png;base64,...)")
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error as e:
            raise ValueError(f"the data: URL is not valid base64 ({e})") from None
    if reference.startswith(("http://", "https://")):
        raise ValueError("remote images are not fetched; download it beside the data file and give its path")
    path = Path(reference)
    if not path.is_file():
        raise ValueError(f"image file {reference} not found")
    return path.read_bytes()


def load_image(reference: str):
    """A resolved reference as an RGB ``PIL.Image`` (fully decoded)."""
    from PIL import Image

    with Image.open(io.BytesIO(_image_bytes(reference))) as img:
        return img.convert("RGB")


def check_image(reference: str) -> str | None:
    """Why a resolved reference is not a readable image, or None if Pillow decodes it."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = _image_bytes(reference)
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # verify() misses truncated pixel data; decoding everything does not
    except UnidentifiedImageError:
        return f"{_short(reference)} is not an image Pillow can read"
    except (ValueError, OSError) as e:
        return f"{_short(reference)}: {e}" if not str(e).startswith("image file") else str(e)
    return None


def _short(reference: str) -> str:
    return reference[:40] + "..." if reference.startswith(_DATA_PREFIX) else reference


def normalise_images(messages: list[dict], base_dir: Path) -> tuple[list[dict], list[str]]:
    """Resolve every image part against ``base_dir`` and check it decodes; image parts outside user
    messages are refused (nothing would ever show a model an image in its own answer).

    Returns:
        The messages with normalised image parts, and the problems found (without the record's location).
    """
    out, errors = [], []
    for n, message in enumerate(messages, start=1):
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for k, part in enumerate(content, start=1):
            if not is_image_part(part):
                parts.append(part)
                continue
            if message["role"] != "user":
                errors.append(f"message {n} ({message['role']}) has an image part; images go in user messages")
                continue
            reference = resolve_reference(part_reference(part) or "", base_dir)
            problem = check_image(reference)
            if problem:
                errors.append(f"message {n} content part {k}: {problem}")
            parts.append({"type": "image", IMAGE_KEY: reference})
        out.append({**message, "content": parts})
    return out, errors


def vision_problems(examples, *, vision: bool, model: str, max_images: int | None = None) -> list[str]:
    """Problems of examples with images for a model: images given to a text-only model, too many per record.

    Args:
        examples: Validated :class:`tunelab.data.records.Example` objects.
        vision: Whether the model has a vision tower.
        model: The model's name for the message.
        max_images: Most images one conversation may hold (None: no limit).
    """
    problems = []
    for example in examples:
        count = len(image_references(example.messages))
        if count and not vision:
            problems.append(f"{example.source}: this record has {count} image(s) but model {model} has no vision tower; "
                            "use an image-text-to-text model or remove the image parts")
        elif max_images is not None and count > max_images:
            problems.append(f"{example.source}: {count} images, more than the {max_images} this model's template takes")
    return problems


def message_content(n: int, value: Any, errors: list[str]) -> str | list[dict] | None:
    """A message's text: a string, or a list of ``{"type": "text", "text"}`` parts joined (as the server does);
    a list with image parts stays a list of text and image parts (:mod:`tunelab.data.images`)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for k, part in enumerate(value, start=1):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif is_image_part(part) and part_reference(part) is not None:
                texts.append(part)
            elif is_image_part(part):
                errors.append(f"message {n} content part {k} is {part.get('type')!r} without a path or url; "
                              'write {"type": "image", "path": "img.png"} or {"type": "image_url", "image_url": {"url": ...}}')
            else:
                kind = repr(part.get("type")) if isinstance(part, dict) else describe_type(part)
                errors.append(f"message {n} content part {k} is {kind}, not {{\"type\": \"text\", \"text\": ...}}; "
                              "training data takes text and image parts only")
        if any(isinstance(t, dict) for t in texts):
            return [{"type": "text", "text": t} if isinstance(t, str) else t for t in texts]
        return "".join(texts)
    errors.append(f"message {n} 'content' must be a string, got {describe_type(value)} (or a list of text parts)")
    return None
