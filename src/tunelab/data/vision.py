"""Tokenize chat examples with images through a VLM's processor, keeping tunelab's trained-span loss mask.

The processor is what knows how many placeholder tokens an image becomes (Qwen2-VL: from the image's grid;
LLaVA: one per patch; Idefics3: a bracketed row of ``<image>`` tokens), so it tokenizes the rendered text with
the images. The mask is found on the same text before expansion (:func:`tunelab.data.tokenize.encode_with_flags`:
the template/prefix logic every text example uses) and carried over to the expanded ids by aligning the two
sequences: tokens the processor inserted are image placeholders and are never trained, and every trained token
must survive the alignment unchanged (else we refuse rather than train the wrong tokens).

Why hand-written: TRL's vision collator masks by template-specific token patterns and trains every
non-padding token unless told otherwise; processors return no character offsets to mask by.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from difflib import SequenceMatcher

import torch

from tunelab.data.images import image_references, load_image
from tunelab.data.records import Example
from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample, TokenizeStats, encode_with_flags
from tunelab.errors import DataError, TunelabError

# Processor outputs a model's forward takes besides input_ids and attention_mask.
VISION_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes")
# Per-token extras (same (1, T) shape as input_ids), padded like the ids.
TOKEN_INPUTS = ("token_type_ids", "mm_token_type_ids")


@dataclass
class VisionExample(TokenizedExample):
    """A tokenized example with the processor's image tensors (each with a leading image or batch dimension)."""

    vision: dict[str, torch.Tensor] = field(default_factory=dict)


def align_flags(short: list[int], flags: list[bool], expanded: list[int], source: str) -> list[bool]:
    """``flags`` of the unexpanded ids carried to the expanded ids; inserted tokens are untrained.

    Raises:
        TunelabError: A trained token has no counterpart in the expanded ids.
    """
    out = [False] * len(expanded)
    matched = 0
    for block in SequenceMatcher(None, short, expanded, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            out[block.b + k] = flags[block.a + k]
            matched += flags[block.a + k]
    if matched != sum(flags):
        raise TunelabError(f"{source}: the processor changed the answer's tokens while expanding images, so the trained "
                           "tokens cannot be located; check the model's chat template and processor")
    return out


def _image_inputs(processor, text: str, example: Example, blank: bool):
    images = [load_image(ref) for ref in image_references(example.messages)]
    if blank:  # the control of the pixel-learning bench: same placeholders, no information in the pixels
        images = [img.point(lambda _: 128) for img in images]
    try:
        return processor(text=[text], images=images or None, return_tensors="pt")
    except Exception as e:  # processors raise ValueError/IndexError on placeholder/image count mismatches
        raise TunelabError(f"{example.source}: the processor refused this record ({type(e).__name__}: {e}); the chat "
                           "template must render one image placeholder per image part") from None


def tokenize_vision_example(example: Example, processor, *, loss_on: str = "assistant", reasoning: bool = True,
                            blank: bool = False) -> VisionExample:
    """One example through the processor, trained tokens as the text path decides, image tokens never trained."""
    text, ids, flags = encode_with_flags(example, processor.tokenizer, loss_on, reasoning)
    out = _image_inputs(processor, text, example, blank)
    expanded = out["input_ids"][0].tolist()
    trained = align_flags(ids, flags, expanded, example.source)
    labels = [t if on else IGNORE_INDEX for t, on in zip(expanded, trained)]
    vision = {k: out[k] for k in (*VISION_INPUTS, *TOKEN_INPUTS) if k in out}
    return VisionExample(expanded, labels, example.source, vision)


def tokenize_vision_examples(examples: list[Example], processor, *, loss_on: str = "assistant", max_length: int = 1024,
                             too_long: str = "truncate", reasoning: bool = True,
                             blank: bool = False) -> tuple[list[VisionExample], TokenizeStats]:
    """:func:`tokenize_vision_example` for every example, with the text path's statistics and length policy,
    except that an example with images is dropped rather than truncated (a cut would separate image tokens
    from their pixels)."""
    kept, stats, problems = [], TokenizeStats(), []
    for example in examples:
        enc = tokenize_vision_example(example, processor, loss_on=loss_on, reasoning=reasoning, blank=blank)
        if len(enc.input_ids) > max_length:
            if too_long == "error":
                problems.append(f"{example.source}: {len(enc.input_ids)} tokens (images expanded) > data.max_length="
                                f"{max_length}; raise data.max_length or use smaller images")
            elif too_long == "truncate" and not enc.vision:
                enc = VisionExample(enc.input_ids[:max_length], enc.labels[:max_length], enc.source)
                stats.truncated += 1
            else:
                stats.dropped.append(example.source)
                continue
        trained = sum(label != IGNORE_INDEX for label in enc.labels)
        if not trained:
            stats.dropped.append(example.source)
            continue
        kept.append(enc)
        stats.tokens += len(enc.input_ids)
        stats.trained_tokens += trained
        stats.max_len = max(stats.max_len, len(enc.input_ids))
    if problems:
        raise DataError(problems, what="tokenized data")
    stats.examples = len(kept)
    stats.mean_len = stats.tokens / len(kept) if kept else 0.0
    return kept, stats


def _pad_to(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad every dimension but the first up to ``shape``."""
    pads: list[int] = []
    for have, want in zip(reversed(tensor.shape[1:]), reversed(shape)):
        pads += [0, want - have]
    return torch.nn.functional.pad(tensor, pads) if any(pads) else tensor


def merge_vision(batch: list[TokenizedExample], width: int) -> dict[str, torch.Tensor]:
    """The image inputs of a padded batch: each key's tensors zero-padded to a common shape and concatenated
    along their first (image or batch) dimension; per-token extras right-padded to ``width``."""
    merged: dict[str, torch.Tensor] = {}
    keys = {k for ex in batch for k in getattr(ex, "vision", {})}
    for key in sorted(keys):
        if key in TOKEN_INPUTS:
            rows = [getattr(ex, "vision", {}).get(key, torch.zeros((1, len(ex.input_ids)), dtype=torch.long)) for ex in batch]
            merged[key] = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1])) for r in rows])
            continue
        tensors = [ex.vision[key] for ex in batch if key in getattr(ex, "vision", {})]
        shape = tuple(max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim()))
        merged[key] = torch.cat([_pad_to(t, shape) for t in tensors])
    return merged


def render_vision_example(example: Example, processor, loss_on: str = "assistant", reasoning: bool = True) -> list[tuple[str, bool]]:
    """``(text, trained)`` runs of an example as the model sees it, image placeholders expanded (a run of one
    repeated token is shown once with its count, ``<image>×16``), for ``tunelab data inspect``."""
    enc = tokenize_vision_example(example, processor, loss_on=loss_on, reasoning=reasoning)
    decode = processor.tokenizer.decode
    runs: list[tuple[str, bool]] = []
    i = 0
    while i < len(enc.input_ids):
        j = i
        while j < len(enc.input_ids) and enc.input_ids[j] == enc.input_ids[i] and enc.labels[j] == enc.labels[i]:
            j += 1
        trained = enc.labels[i] != IGNORE_INDEX
        piece = decode(enc.input_ids[i:j], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if j - i > 3:
            piece = f"{decode(enc.input_ids[i:i + 1], skip_special_tokens=False)}×{j - i}"
        if runs and runs[-1][1] == trained:
            runs[-1] = (runs[-1][0] + piece, trained)
        else:
            runs.append((piece, trained))
        i = j
    return runs
