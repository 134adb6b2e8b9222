"""A run's training data measured for the planner: read and tokenised as the run would, then profiled.

Here, not in ``planning/``, because reading a run's examples is a stage (``stages.setup``, ``stages.defaults``)
and the planner sits below the stages (``stages.model`` asks it how many blocks to checkpoint).
"""

from __future__ import annotations

from rich.console import Console

from tunelab.config.schema import RunConfig
from tunelab.planning.data import DataProfile, profile_examples
from tunelab.stages.defaults import choose_defaults
from tunelab.stages.setup import load_prepared_tokenizer, read_examples, tokenize


def profile_data(config: RunConfig) -> tuple[RunConfig, DataProfile]:
    """Tokenise the training data with the model's tokenizer (no weights) and measure its micro-batches; a config
    whose recipe chooses defaults from the data first gets those the run would choose (printed).

    Returns:
        The run description as the run would train it (with those defaults; ``config`` is frozen and left as it
        was) and the profile of its data: plan that description with that profile.
    """
    model_path, tokenizer, added = load_prepared_tokenizer(config)
    examples = read_examples(config)
    if config.recipe.needs.data_defaults:
        config, examples, _ = choose_defaults(config, examples, tokenizer, model_path, Console(stderr=True))
    return config, profile_examples(config, tokenize(config, tokenizer, examples, added).train)
