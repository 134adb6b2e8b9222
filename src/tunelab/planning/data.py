"""The training data as the planner sees it: a tokenised profile of one epoch's micro-batches, or just the
number of examples. Reading and tokenising a run's data is the stages' (``tunelab.stages.profile.profile_data``):
the planner sits below them and only measures what it is given."""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.config.schema import RunConfig


@dataclass(frozen=True)
class DataProfile:
    """The tokenised training data of one epoch, batched as tunelab batches it."""

    examples: int
    tokens: int  # real tokens
    trained_tokens: int
    processed_tokens: int  # tokens of the padded (or packed) micro-batches
    longest: int
    peak_rows: int  # the micro-batch with the most tokens: its rows and its tokens per row
    peak_seq: int
    peak_trained: int  # the most trained positions in one micro-batch


def profile_examples(config: RunConfig, data: list) -> DataProfile:
    """Measure the micro-batches of one epoch of already tokenised examples (``TokenizedExample``), in the
    training loop's order (the first epoch's)."""
    from tunelab.training.schedule import epoch_batches

    lengths = [len(ex.input_ids) for ex in data]
    trained = [sum(1 for t in ex.labels[1:] if t != -100) for ex in data]
    batches = epoch_batches(len(data), config.train.batch_size, config.train.seed, 0)
    processed, peak = 0, (0, 1, 1)
    for ids in batches:
        rows, seq = (1, sum(lengths[i] for i in ids)) if config.train.packing else (len(ids), max(lengths[i] for i in ids))
        processed += rows * seq
        peak = max(peak, (rows * seq, rows, seq))
    most_trained = max(sum(trained[i] for i in ids) for ids in batches)
    return DataProfile(len(data), sum(lengths), sum(trained), processed, max(lengths), peak[1], peak[2], most_trained)


def count_examples(config: RunConfig) -> int | None:
    """Examples in an epoch of data.train, read but not tokenised (a weighted mixture's epoch size with
    ``data.replay``: the other sources over 1 − ratio); None if a file cannot be read."""
    from tunelab.data.readers import read_file
    from tunelab.training.schedule import mixture_epoch_size

    counts = []
    for path in config.data.train_files():
        raw = read_file(path)
        if any(position == 0 for position, _ in raw.problems):
            return None
        counts.append(len(raw.records))
    replay = config.data.replay
    return mixture_epoch_size(sum(counts[:-1]) if replay else sum(counts), replay.ratio if replay else None)
