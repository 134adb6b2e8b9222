"""Vision-language models: tiny random ones of real architectures, loading, and which parts are the language model.

No VLM weights can be downloaded here, so the contract tests and the pixel-learning bench build tiny randomly
initialised models from transformers' own config classes (Qwen2-VL, LLaVA with a CLIP tower) with a processor
assembled locally: the tiny byte-level tokenizer of :mod:`tunelab.models.tiny` plus that architecture's image
token(s), image processor (Pillow backend, small images) and a chat template in the architecture's placeholder
style. Saved as a plain directory, ``model:`` points at it exactly as at a real local VLM.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tunelab.models.tiny import build_tiny_tokenizer

ARCHITECTURES = ("llava", "idefics3", "qwen2_vl")

_TURN_OPEN = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
_TURN_CLOSE = (
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _template(image_text: str) -> str:
    """A ChatML template whose image parts render as ``image_text`` (the processor expands it)."""
    return (
        _TURN_OPEN + "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image_text +
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}" + _TURN_CLOSE
    )


QWEN2_VL_TEMPLATE = _template("<|vision_start|><|image_pad|><|vision_end|>")
LLAVA_TEMPLATE = _template("<image>\n")
IDEFICS3_TEMPLATE = _template("<image>")


def _tokenizer(extra: list[str], template: str):
    tok = build_tiny_tokenizer(chat_template=template)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|endoftext|>", *extra]})
    return tok


def _qwen2_vl(hidden: int, layers: int, image_size: int):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = _tokenizer(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"], QWEN2_VL_TEMPLATE)
    pixels = image_size * image_size
    images = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2)
    processor = Qwen2VLProcessor(image_processor=images, tokenizer=tok, chat_template=QWEN2_VL_TEMPLATE)
    head_dim = hidden // 4
    third = head_dim // 2 // 3
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [head_dim // 2 - 2 * third, third, third]})
    vision = dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in
           (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    return Qwen2VLForConditionalGeneration(config), processor


def _llava(hidden: int, layers: int, image_size: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _tokenizer(["<image>"], LLAVA_TEMPLATE)
    images = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE, image_token="<image>")
    text = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=14)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    return LlavaForConditionalGeneration(config), processor


def _idefics3(hidden: int, layers: int, image_size: int):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = _tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"], IDEFICS3_TEMPLATE)
    images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": image_size},
                                       max_image_size={"longest_edge": image_size})
    patch, scale = 14, 2
    processor = Idefics3Processor(image_processor=images, tokenizer=tok, chat_template=IDEFICS3_TEMPLATE,
                                  image_seq_len=(image_size // patch) ** 2 // scale**2)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=image_size, patch_size=patch)
    config = Idefics3Config(vision_config=vision, text_config=text.to_dict(), scale_factor=scale,
                            image_token_id=tok.convert_tokens_to_ids("<image>"))
    return Idefics3ForConditionalGeneration(config), processor


def build_tiny_vlm(arch: str = "qwen2_vl", *, seed: int = 0, hidden: int = 64, layers: int = 2, image_size: int = 56):
    """A randomly initialised image-text-to-text model and its processor.

    Args:
        arch: ``"qwen2_vl"`` or ``"llava"``.
        seed: Seed of the random weights.
        hidden: Hidden size of the language model (a multiple of 4; the vision side is 32 wide).
        layers: Decoder blocks of the language model (the vision tower has one).
        image_size: Images are resized to ``image_size`` square (a multiple of 28): 4 image tokens at 56 for
            Qwen2-VL (14-pixel patches merged 2x2), ``(image_size/14)**2`` for LLaVA.

    Returns:
        ``(model, processor)``.
    """
    builders = {"qwen2_vl": _qwen2_vl, "llava": _llava, "idefics3": _idefics3}
    if arch not in builders:
        raise ValueError(f"unknown tiny VLM architecture {arch!r}; use one of {', '.join(ARCHITECTURES)}")
    torch.manual_seed(seed)
    model, processor = builders[arch](hidden, layers, image_size)
    tok = processor.tokenizer
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    return model.float(), processor


def save_tiny_vlm(directory: str | Path, arch: str = "qwen2_vl", **kwargs) -> Path:
    """Build a tiny VLM and save model, processor and tokenizer (with the chat template) as a plain HF directory."""
    directory = Path(directory)
    model, processor = build_tiny_vlm(arch, **kwargs)
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    processor.tokenizer.save_pretrained(directory)  # AutoTokenizer alone (text paths) gets the same template
    return directory


def is_vision_config(config) -> bool:
    """Whether a transformers config describes a model with a vision tower."""
    return getattr(config, "vision_config", None) is not None


def load_processor(path: str, trust_remote_code: bool = False):
    """The ``AutoProcessor`` of a local VLM directory."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)


def language_model_prefix(model: torch.nn.Module) -> str:
    """The qualified name of the language model inside a VLM (``model.language_model``, ``model.text_model``)."""
    decoder = model.get_decoder()
    for name, module in model.named_modules():
        if module is decoder and name:
            return name
    raise ValueError(f"{type(model).__name__}: cannot locate the language model; give method.target_modules explicitly")


def language_linear_pattern(model: torch.nn.Module) -> str:
    """A regex (peft ``target_modules``) of every linear layer inside the language model, so LoRA's
    ``all-linear`` leaves the vision tower and the projector alone."""
    prefix = language_model_prefix(model)
    leaves = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) and name.startswith(prefix + ".")})
    return rf"(.*\.)?{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, leaves))})"


# Module names under which transformers keeps a VLM's multi-modal projector (LLaVA, Gemma 3, Mistral 3, InternVL:
# multi_modal_projector; Idefics2/3, SmolVLM: connector; Qwen2-VL and later: visual.merger, deepstack_merger_list).
PROJECTOR_NAMES = frozenset({"multi_modal_projector", "connector", "merger", "deepstack_merger_list", "mm_projector"})


def vision_parts(model: torch.nn.Module) -> dict[str, list[str]]:
    """The parameter names of a VLM outside its language model and output head, by part: ``projector`` (under a
    module named in :data:`PROJECTOR_NAMES`) and ``tower`` (the rest: the vision encoder and its embeddings).
    Works on a model a method has wrapped in place (LoRA layers are named under the module they adapt)."""
    keep = {id(p) for p in model.get_decoder().parameters()}
    head = model.get_output_embeddings()
    keep |= {id(p) for p in (head.parameters() if head is not None else ())}
    parts: dict[str, list[str]] = {"projector": [], "tower": []}
    for name, param in model.named_parameters():
        if id(param) not in keep:
            parts["projector" if PROJECTOR_NAMES & set(name.split(".")) else "tower"].append(name)
    return parts


def trained_vision_parts(train_vision: str) -> tuple[str, ...]:
    """The parts ``method.train_vision`` trains: none, the projector, or the projector and the tower."""
    return {"none": (), "projector": ("projector",), "tower": ("projector", "tower")}[train_vision]


def vision_linear_pattern(model: torch.nn.Module, train_vision: str) -> str | None:
    """A regex (peft ``target_modules``) of the linear layers in the parts ``train_vision`` trains, with block
    indices generalised (one alternative per layer of a block); None where those parts have no linear layer."""
    parts = vision_parts(model)
    names = {n for part in trained_vision_parts(train_vision) for n in parts[part]}
    linears = sorted({_indices_generalised(name) for name, module in model.named_modules()
                      if isinstance(module, torch.nn.Linear) and f"{name}.weight" in names})
    return rf"(.*\.)?({'|'.join(linears)})" if linears else None


def _indices_generalised(name: str) -> str:
    """A module name as a regex matching the same module in every block (numbered path parts but the last)."""
    parts = name.split(".")
    return r"\.".join(r"\d+" if part.isdigit() and i < len(parts) - 1 else re.escape(part) for i, part in enumerate(parts))


def directory_has_vision(directory: str | Path) -> str | None:
    """The ``model_type`` of a local model directory whose config has a vision tower, else None (nothing loaded)."""
    import json

    config = Path(directory).expanduser() / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text(encoding="utf-8"))
    return str(data.get("model_type", "unknown")) if data.get("vision_config") else None


def auto_model_class(directory: str | Path):
    """``AutoModelForImageTextToText`` for a local VLM directory, else ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if directory_has_vision(directory) else AutoModelForCausalLM


def save_processor_files(base: str | Path, directory: str | Path) -> bool:
    """Write the base VLM's processor (image processor, processor config) into ``directory``; False for a text
    model. Call before saving the tokenizer there, so the training tokenizer and chat template win."""
    if not directory_has_vision(base):
        return False
    load_processor(str(base)).save_pretrained(str(directory))
    return True
