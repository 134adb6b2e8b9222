"""Setup steps shared by recipes and the ``data inspect`` command: read config into data and model.

These functions translate config sections into the plain arguments the components take, so the
components never see a config object.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tunelab.config.schema import RunConfig
from tunelab.data import IGNORE_INDEX, Example, TokenizedExample, TokenizeStats, load_examples, prepare_tokenizer, turn_markers
from tunelab.data.token_cache import cached_tokenize
from tunelab.errors import DataError, TunelabError
from tunelab.training.schedule import mixture_epoch_size
from tunelab.models.load import load_model, load_tokenizer, resolve_model_path


@dataclass
class Examples:
    train: list[Example]
    eval: list[Example] = field(default_factory=list)  # the task evaluation's examples (data.eval, else the validation)
    validation: list[Example] = field(default_factory=list)  # held out of data.train for the validation loss


@dataclass
class TokenizedData:
    train: list[TokenizedExample]
    train_stats: TokenizeStats
    eval: list[TokenizedExample]
    eval_stats: TokenizeStats | None
    added_tokens: list[str]


def read_examples(config: RunConfig) -> Examples:
    """Read and validate every train and eval record; raises DataError listing every bad one."""
    data = config.data
    template = data.template.model_dump() if data.template else None
    kwargs = dict(format=data.format, template=template, system_prompt=data.system_prompt)
    problems: list[str] = []
    train: list[Example] = []
    evals: list[Example] = []
    try:
        train = load_examples(data.train_files(), **kwargs)
    except DataError as err:
        problems += err.problems
    if data.eval_files():
        try:
            evals = load_examples(data.eval_files(), **kwargs)
        except DataError as err:
            problems += err.problems
    if problems:
        raise DataError(problems, what=", ".join(data.train_files() + data.eval_files()))
    return split_validation(config, Examples(train=train, eval=evals))


def split_validation(config: RunConfig, examples: Examples) -> Examples:
    """With ``data.validation``, hold that slice of the train examples out (never a replayed one): it is the
    validation data, and the task evaluation's too when there is no ``data.eval``."""
    if not config.data.validation or examples.validation:
        return examples
    replay = config.data.replay.path if config.data.replay else None
    train, held = hold_out(examples.train, config.data.validation, config.train.seed,
                           eligible=lambda e: replay is None or not e.source.startswith(f"{replay}:"))
    return Examples(train=train, eval=examples.eval or held, validation=held)


def hold_out(examples: list[Example], validation: float | int, seed: int,
             eligible=lambda example: True) -> tuple[list[Example], list[Example]]:
    """``(train, held)``: ``validation`` examples (a count, or a share below 1 of the eligible ones) drawn by
    ``seed`` among the ``eligible`` ones, each side in file order; at least one example stays on each side.

    Raises:
        TunelabError: Too few examples to hold any out.
    """
    pool = [i for i, e in enumerate(examples) if eligible(e)]
    if len(pool) < 2:
        raise TunelabError(f"data.validation: {len(pool)} train example(s) is too few to hold any out; give data.eval")
    n = validation if isinstance(validation, int) else round(validation * len(pool))
    n = min(max(n, 1), len(pool) - 1)
    held = set(random.Random(seed).sample(pool, n))
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def load_prepared_tokenizer(config: RunConfig):
    """Resolve the model and load its tokenizer with the configured chat template applied.

    Returns:
        (resolved model path, tokenizer, tokens whose embedding rows training must learn): the tokens the
        template fallback added to the vocabulary, and, for a model without a chat template of its own, the
        turn markers of the template tunelab applied. Those are in the vocabulary but the base model never
        learned them as turn markers: Gemma 3 270M tuned with LoRA alone gave ``<end_of_turn>`` a probability
        of about 0 where an answer ends, so no answer stopped; with the two marker rows trained, 12 of 12 did.
    """
    model_path = resolve_model_path(config.model.path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=config.model.trust_remote_code)
    had_template = bool(tokenizer.chat_template)
    added = prepare_tokenizer(tokenizer, config.data.chat_template)
    if not had_template:
        added += [marker for marker in turn_markers(tokenizer) if marker not in added]
    return model_path, tokenizer, added


def load_base_model(config: RunConfig, model_path: str, tokenizer, added_tokens: list[str], device, **load_kwargs):
    """The untuned model on ``device``, with embeddings resized for tokens a chat-template fallback added.

    ``load_kwargs`` go to ``from_pretrained`` (a method's quantisation); a model placed by ``device_map``
    is left where it was put.
    """
    model = load_model(model_path, config.model.dtype, config.model.trust_remote_code, **load_kwargs)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:  # as evaluation.run does for a saved run
        model.resize_token_embeddings(len(tokenizer))
    return model if "device_map" in load_kwargs else model.to(device)


def tokenize(config: RunConfig, tokenizer, examples: Examples, added_tokens: list[str]) -> TokenizedData:
    """Tokenize train and eval examples with the configured loss mask and too-long policy."""
    data = config.data
    from tunelab.stages.vision import any_images, check_vision_data, tokenize_with_images

    check_vision_data(config.method, examples.train)  # method.train_vision needs images to train on
    if any_images(examples.train, examples.validation or examples.eval):  # a VLM's processor expands the images
        train, train_stats, evals, eval_stats = tokenize_with_images(config, examples.train, examples.validation or examples.eval)
        if not train:
            raise DataError([f"no training example is left after tokenization ({len(train_stats.dropped)} dropped as too long); raise data.max_length"], what="data.train")
        return TokenizedData(train, train_stats, evals, eval_stats, added_tokens)
    kwargs = dict(loss_on=data.loss_on, max_length=data.max_length, too_long=data.too_long, reasoning=data.train_on_reasoning)
    train, train_stats, _ = cached_tokenize(examples.train, tokenizer, **kwargs)
    if not train:
        raise DataError([f"no training example is left after tokenization ({len(train_stats.dropped)} dropped as too long); raise data.max_length"], what="data.train")
    untrained = [ex.source for ex in train if all(label == IGNORE_INDEX for label in ex.labels)]
    if untrained:
        raise DataError(
            [f"{source}: no token of this example is trained (the chat template renders no assistant answer to learn); "
             "check data.chat_template and data.loss_on with `tunelab data inspect`" for source in untrained],
            what="data.train",
        )
    evals, eval_stats = ([], None)
    if examples.validation or examples.eval:  # the validation loss's examples
        evals, eval_stats, _ = cached_tokenize(examples.validation or examples.eval, tokenizer, **kwargs)
    return TokenizedData(train, train_stats, evals, eval_stats, added_tokens)


@dataclass(frozen=True)
class Mixture:
    """A weighted training mixture over the tokenized examples: the epoch size and each source's (examples, weight)."""

    epoch_size: int
    sources: tuple[tuple[int, float], ...]
    names: tuple[str, ...]
    of: tuple[int, ...] = ()  # each training example's source (an index into names), for the per-source losses

    def describe(self) -> str:
        return ", ".join(f"{name} {size} x {weight:g}" for name, (size, weight) in zip(self.names, self.sources)) + \
            f" -> {self.epoch_size} examples an epoch"


def mixture_of(config: RunConfig, examples: list) -> Mixture | None:
    """The mixture ``data.train`` weights or ``data.replay`` ask for, over ``examples`` (tokenized, in file order);
    None when the files are simply concatenated. The epoch has as many examples as the sources other than the
    replay have together, plus the replay's share of the epoch."""
    sources = config.data.mixture()
    if sources is None:
        return None
    sizes, of = [], [-1] * len(examples)
    for index, (path, name, _) in enumerate(sources):
        mine = [i for i, e in enumerate(examples) if getattr(e, "source", "").startswith(f"{path}:")]
        sizes.append(len(mine))
        for i in mine:
            of[i] = index
        if sizes[-1] == 0:
            raise DataError([f"{path}: no training example of source {name!r} is left; weighted mixtures and replay "
                             "read record files (sft; not folders of text)"], what="data.train")
    if sum(sizes) != len(examples):
        raise DataError(["data.train: a file appears in the mixture twice; give each source once"], what="data.train")
    replay = config.data.replay
    epoch = mixture_epoch_size(sum(sizes[:-1]) if replay else sum(sizes), replay.ratio if replay else None)
    return Mixture(epoch, tuple((size, weight) for size, (_, _, weight) in zip(sizes, sources)),
                   tuple(name for _, name, _ in sources), tuple(of))
