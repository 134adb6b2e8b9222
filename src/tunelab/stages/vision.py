"""The image side of a run: refuse images a model cannot see, tokenize through the processor, and keep LoRA's
``all-linear`` on the language model so the vision tower and projector stay frozen.

Only runs whose data has image parts come here; text-only data (on a VLM too) takes the text path unchanged.
"""

from __future__ import annotations

from tunelab.config.schema import RunConfig
from tunelab.data.images import has_images, vision_problems
from tunelab.data.vision import tokenize_vision_examples
from tunelab.errors import DataError, TunelabError
from tunelab.models.load import resolve_model_path
from tunelab.models.vision import is_vision_config, language_linear_pattern, load_processor


def any_images(*groups) -> bool:
    """Whether any example of the given lists holds an image part."""
    return any(has_images(e.messages) for group in groups for e in group)


def model_sees_images(model_path: str, trust_remote_code: bool = False) -> bool:
    """Whether the model at ``model_path`` has a vision tower (read from its config, nothing loaded)."""
    from transformers import AutoConfig

    return is_vision_config(AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code))


def check_images_fit(config: RunConfig, examples: list, model_path: str) -> None:
    """Refuse, before any weight loads, image records for a text-only model and packing with images."""
    problems = vision_problems(examples, vision=model_sees_images(model_path, config.model.trust_remote_code),
                               model=config.model.path)
    if problems:
        raise DataError(problems, what="data")
    if config.train.packing:
        raise TunelabError("train.packing cannot pack examples with images (a row's image features would have to "
                           "follow its examples); set train.packing=false")


def tokenize_with_images(config: RunConfig, train: list, evals: list):
    """Train and eval examples through the model's processor; ``(train, train_stats, eval, eval_stats)``."""
    model_path = resolve_model_path(config.model.path)
    check_images_fit(config, train + evals, model_path)
    processor = load_processor(model_path, config.model.trust_remote_code)
    data = config.data
    kwargs = dict(loss_on=data.loss_on, max_length=data.max_length, too_long=data.too_long, reasoning=data.train_on_reasoning)
    tokenized, stats = tokenize_vision_examples(train, processor, **kwargs)
    tokenized_evals, eval_stats = tokenize_vision_examples(evals, processor, **kwargs) if evals else ([], None)
    return tokenized, stats, tokenized_evals, eval_stats


def language_only(model, options):
    """Method options whose ``all-linear`` targets only the language model of a VLM (else unchanged)."""
    if is_vision_config(model.config) and getattr(options, "target_modules", None) == "all-linear":
        return options.model_copy(update={"target_modules": language_linear_pattern(model)})
    return options


def freeze_vision(model) -> int:
    """Freeze every parameter of a VLM outside its language model and output head (the vision tower and the
    projector), whatever the method made trainable; returns how many tensors it froze (0 for a text model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not is_vision_config(base.config):
        return 0
    keep = {id(p) for p in base.get_decoder().parameters()}
    keep |= {id(p) for p in base.get_output_embeddings().parameters()}
    frozen = 0
    for param in base.parameters():
        if id(param) not in keep and param.requires_grad:
            param.requires_grad_(False)
            frozen += 1
    return frozen


def render_for_inspect(config: RunConfig, example, tokenizer) -> list[tuple[str, bool]]:
    """``tunelab data inspect``'s rendering of one example: through the processor when it has images."""
    from tunelab.data import render_example

    data = config.data
    if not has_images(example.messages):
        return render_example(example, tokenizer, loss_on=data.loss_on, reasoning=data.train_on_reasoning)
    from tunelab.data.vision import render_vision_example

    processor = load_processor(resolve_model_path(config.model.path), config.model.trust_remote_code)
    return render_vision_example(example, processor, loss_on=data.loss_on, reasoning=data.train_on_reasoning)
