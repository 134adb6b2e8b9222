"""A vision-language model's image side in ``tunelab plan``'s terms: the vision tower and the projector, and the
image tokens of the training data.

What is counted, exactly or by the stated approximation:

* **Parameters**, exactly: the model is built from its config on the meta device (no weights, no memory) and split
  into tower and projector as training splits it (``tunelab.models.vision.vision_parts``). Their weights are
  resident in every phase (``w`` bytes each; under QLoRA their linear layers are quantised like the language
  model's). What ``method.train_vision`` trains adds its gradients and AdamW states: all the part's weights for
  full and freeze, float32 adapters of rank ``r`` on its linear layers (``r*(d_in + d_out)`` each) for LoRA.
* **Image tokens per example**, exactly for the examples measured: the first ``SAMPLE`` training examples with
  images go through the model's own processor (as training tokenizes them) and the model's image token is counted.
  They are part of each row, so the language model's activations already hold them (a row is at most
  ``data.max_length``; an image example longer than that is dropped, never truncated).
* **Activations of the image side**, approximated: when the projector trains, each of its linear layers keeps its
  input and output per image token (``c*sum(d_in + d_out)``); when the tower trains too, each of its linear layers
  does the same per tower position (image tokens x the positions merged into one, e.g. Idefics3's pixel shuffle:
  ``scale_factor**2``; Qwen2-VL: ``spatial_merge_size**2``), which is ~36*d bytes per position and layer at 16
  bits (Korthikanti et al. 2022, arXiv:2205.05198, count 34*d), without checkpointing. A frozen image side keeps
  nothing; then the language model's input does not require grad either.
* **Time**: the tower and projector matmuls, 2 FLOPs per weight and position forward and 4 more backward where
  the part trains (attention over patches not counted), spread over the row's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.config.schema import RunConfig
from tunelab.methods.options import vision_training
from tunelab.planning.memory import VisionCost, quantised_bytes
from tunelab.planning.method import PlannedMethod
from tunelab.planning.shape import embedded_shape

SAMPLE = 64  # image examples run through the processor to count their image tokens


@dataclass(frozen=True)
class VisionShape:
    """The tower's and projector's sizes (``part`` -> figure, parts ``tower`` and ``projector``)."""

    params: dict[str, int]
    linear_weights: dict[str, int]  # sum of d_in*d_out over the part's linear layers
    linear_widths: dict[str, int]  # sum of d_in + d_out over the part's linear layers
    positions_per_token: int  # tower positions behind one image token of the language model


@dataclass(frozen=True)
class ImageProfile:
    """Image tokens (the model's image placeholder, expanded by the processor) of the training examples."""

    examples: int  # training examples with images
    of: int  # training examples
    measured: int  # of them, run through the processor
    images: int  # the most images in one example
    tokens_mean: float  # image tokens per image example
    tokens_max: int


@dataclass(frozen=True)
class VisionPlan:
    shape: VisionShape
    images: ImageProfile | None  # None: the data could not be read or measured
    train_vision: str
    note: str = ""  # why there is no image profile


def load_vision(config: RunConfig) -> VisionPlan | None:
    """The image side of the configured model and data; None for a text model (its config has no vision tower)."""
    from transformers import AutoConfig

    from tunelab.models.load import resolve_model_path
    from tunelab.models.vision import is_vision_config

    if embedded_shape(config.model.path) is not None:  # an embedded text model, not converted just to plan it
        return None
    path = resolve_model_path(config.model.path)
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=config.model.trust_remote_code)
    if not is_vision_config(cfg):
        return None
    shape = vision_shape(cfg, config.model.trust_remote_code)
    try:
        images, note = image_profile(config, path, cfg), ""
    except Exception as exc:  # noqa: BLE001 - unreadable data or a processor that refuses: planned without images
        images, note = None, f"image tokens not measured ({type(exc).__name__}: {exc})"
    return VisionPlan(shape, images, vision_training(config.method), note)


def vision_shape(cfg, trust_remote_code: bool = False) -> VisionShape:
    """Exact parameter counts of the tower and the projector, from the model built on the meta device."""
    import torch
    from transformers import AutoModelForImageTextToText

    from tunelab.models.vision import vision_parts

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg, trust_remote_code=trust_remote_code)
    params = dict(model.named_parameters())
    counts, weights, widths = {}, {}, {}
    for part, names in vision_parts(model).items():
        owned = set(names)
        linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and f"{n}.weight" in owned]
        counts[part] = sum(params[n].numel() for n in names)
        weights[part] = sum(m.in_features * m.out_features for m in linears)
        widths[part] = sum(m.in_features + m.out_features for m in linears)
    vision = cfg.vision_config
    merge = getattr(cfg, "scale_factor", None) or getattr(vision, "spatial_merge_size", None) or 1
    return VisionShape(counts, weights, widths, int(merge) ** 2)


def image_profile(config: RunConfig, model_path: str, cfg) -> ImageProfile:
    """Count the image tokens of the first :data:`SAMPLE` training examples with images, through the processor."""
    from tunelab.data import load_examples
    from tunelab.data.images import has_images, image_references
    from tunelab.data.vision import tokenize_vision_example
    from tunelab.models.vision import load_processor

    data = config.data
    examples = load_examples(data.train_files(), format=data.format, system_prompt=data.system_prompt,
                             template=data.template.model_dump() if data.template else None)
    with_images = [ex for ex in examples if has_images(ex.messages)]
    if not with_images:
        return ImageProfile(0, len(examples), 0, 0, 0.0, 0)
    token = getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)
    if token is None:
        raise ValueError(f"the {cfg.model_type} config names no image token")
    processor = load_processor(model_path, config.model.trust_remote_code)
    sample = with_images[:SAMPLE]
    counts = [tokenize_vision_example(ex, processor, loss_on=data.loss_on, reasoning=data.train_on_reasoning)
              .input_ids.count(token) for ex in sample]
    images = max(len(image_references(ex.messages)) for ex in sample)
    return ImageProfile(len(with_images), len(examples), len(sample), images, sum(counts) / len(counts), max(counts))


def vision_cost(v: VisionPlan, m: PlannedMethod, *, w: int, c: int, rows: int) -> VisionCost:
    """The bytes the image side adds: weights always; with ``train_vision``, what trains and what it keeps for a
    micro-batch of ``rows`` rows, each with the most image tokens measured."""
    from tunelab.models.vision import trained_vision_parts

    s, trained = v.shape, trained_vision_parts(v.train_vision)
    total, linear = sum(s.params.values()), sum(s.linear_weights.values())
    weights = int(quantised_bytes(m) * linear + 4 * (total - linear)) if m.quant_bits else w * total
    rank = max(m.lora.values(), default=0)
    added = sum(4 * rank * s.linear_widths[part] for part in trained) if rank else 0
    own = 0 if m.frozen_base else sum(w * s.params[part] for part in trained)
    tokens = rows * (v.images.tokens_max if v.images else 0)
    activations = tokens * c * s.linear_widths["projector"] if trained else 0
    if "tower" in trained:
        activations += tokens * s.positions_per_token * c * s.linear_widths["tower"]
    return VisionCost(weights, added, own, activations)


def trained_params(v: VisionPlan, m: PlannedMethod) -> tuple[int, int]:
    """(parameters the method adds to the image side, image-side parameters that train, added ones included)."""
    from tunelab.models.vision import trained_vision_parts

    trained = trained_vision_parts(v.train_vision)
    rank = max(m.lora.values(), default=0)
    added = sum(rank * v.shape.linear_widths[part] for part in trained)
    own = 0 if m.frozen_base else sum(v.shape.params[part] for part in trained)
    return added, added + own


def vision_flops(v: VisionPlan) -> float:
    """Training FLOPs of the image side per training example (its matmuls; mean image tokens over all examples)."""
    from tunelab.models.vision import trained_vision_parts

    if v.images is None or not v.images.tokens_mean:
        return 0.0
    s, trained = v.shape, trained_vision_parts(v.train_vision)
    tokens = v.images.tokens_mean * v.images.examples / v.images.of
    positions = {"projector": tokens, "tower": tokens * s.positions_per_token}
    return sum(2 * s.linear_weights[part] * n * (3 if part in trained else 1) for part, n in positions.items())


def describe(v: VisionPlan, m: PlannedMethod) -> list[str]:
    """The plan's lines on the image side: its parameters, what trains, and the image tokens measured."""
    from tunelab.models.vision import trained_vision_parts

    trained, how = trained_vision_parts(v.train_vision), "LoRA adapters on its linear layers" if m.lora else "all its weights"
    parts = [f"{part} {v.shape.params[part]:,} parameters, " + (f"trained ({how})" if part in trained else "frozen")
             for part in ("tower", "projector")]
    lines = [f"vision (method.train_vision={v.train_vision}): {'; '.join(parts)}; counted in the weights"
             + (", gradients, AdamW states and activations" if trained else "")]
    i = v.images
    if i is None:
        lines.append(f"vision: {v.note}")
    elif i.examples:
        lines.append(f"vision: {i.tokens_mean:.0f} image tokens per image example on average, at most {i.tokens_max} "
                     f"({i.images} image{'s' if i.images > 1 else ''} at most), counted by the processor on {i.measured} "
                     f"of the {i.examples} training examples with images; they are inside each row's data.max_length")
    else:
        lines.append("vision: no training example has an image (0 image tokens)")
    return lines
