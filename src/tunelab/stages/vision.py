"""The image side of a run: refuse images a model cannot see, tokenize through the processor, keep LoRA's
``all-linear`` on the language model, and train the projector and the vision tower only as
``method.train_vision`` asks (``none``: both stay frozen, for every method).

``method.train_vision`` (lora, qlora, full, freeze; the other methods refuse it when the config loads):
``projector`` also trains the multi-modal projector, ``tower`` the projector and the vision tower. LoRA and QLoRA
put adapters on their linear layers (so the artifact stays a PEFT adapter that merges and loads like any
other; norms, patch embeddings and raw parameters of those parts stay frozen); full and freeze train all their
weights. A text-only model, or training data without a single image, is refused before anything loads.

Tokenizing through the processor is for runs whose data has image parts; text-only data (on a VLM too) takes
the text path unchanged.
"""

from __future__ import annotations

import re

from tunelab.config.schema import RunConfig
from tunelab.data.images import has_images, vision_problems
from tunelab.data.vision import tokenize_vision_examples
from tunelab.errors import DataError, TunelabError
from tunelab.methods.options import vision_training
from tunelab.models.load import resolve_model_path
from tunelab.models.vision import (
    PROJECTOR_NAMES, is_vision_config, language_linear_pattern, load_processor, trained_vision_parts, vision_linear_pattern,
    vision_parts,
)


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


def check_vision_training(options, model_config) -> None:
    """Refuse ``method.train_vision`` on a text-only model (from its transformers config, nothing loaded)."""
    wanted = vision_training(options)
    if wanted != "none" and model_config is not None and not is_vision_config(model_config):
        raise TunelabError(f"method.train_vision={wanted}: the {getattr(model_config, 'model_type', '?')} model is "
                           "text-only (its config has no vision_config), so there is no projector or vision tower to "
                           "train; leave method.train_vision out (none) or use a vision-language model")


def check_vision_data(options, train: list) -> None:
    """Refuse ``method.train_vision`` when no training example has an image: the projector would get no gradient."""
    wanted = vision_training(options)
    if wanted != "none" and not any_images(train):
        raise TunelabError(f"method.train_vision={wanted}: no training example has an image, so the {wanted} would get "
                           "no gradient; add image records to data.train or leave method.train_vision out (none)")


def vision_options(model, options):
    """Method options for a VLM (others unchanged): LoRA's ``all-linear`` targets the language model's linear layers
    only, and with ``method.train_vision`` the projector's (and the tower's) linear layers are targets too."""
    if not is_vision_config(model.config) or "target_modules" not in type(options).model_fields:
        return options
    targets = options.target_modules
    if targets == "all-linear":
        targets = language_linear_pattern(model)
    vision = vision_linear_pattern(model, vision_training(options))
    if vision is not None:  # peft matches one string against every full module name, as either alternative
        own = targets if isinstance(targets, str) else rf"(.*\.)?({'|'.join(map(re.escape, targets))})"
        targets = f"(?:{own})|(?:{vision})"
    return options if targets == options.target_modules else options.model_copy(update={"target_modules": targets})


def freeze_vision(model, train_vision: str = "none") -> int:
    """Freeze every parameter of a VLM outside its language model and output head (the vision tower and the
    projector), whatever the method made trainable, except in the parts ``train_vision`` trains; returns how many
    tensors it froze (0 for a text model).

    Raises:
        TunelabError: ``train_vision`` names a part this model's projector cannot be told apart in, or in which
            the method made nothing trainable (LoRA on a projector without linear layers).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not is_vision_config(base.config):
        return 0
    parts, trained = vision_parts(base), trained_vision_parts(train_vision)
    if train_vision == "projector" and not parts["projector"]:
        raise TunelabError(f"method.train_vision=projector: cannot tell the projector of this {base.config.model_type} "
                           f"model from its vision tower (no module named {', '.join(sorted(PROJECTOR_NAMES))}); "
                           "use method.train_vision=tower or none")
    params, frozen = dict(base.named_parameters()), 0
    for part, names in parts.items():
        if part not in trained:
            frozen += sum(params[n].requires_grad for n in names)
            for name in names:
                params[name].requires_grad_(False)
        elif names and not any(params[n].requires_grad for n in names):
            raise TunelabError(f"method.train_vision={train_vision}: the method trains nothing in the {part} of this "
                               f"{base.config.model_type} model (LoRA adapts linear layers; it has none); use method "
                               "full or freeze, or method.train_vision=none")
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
