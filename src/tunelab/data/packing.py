"""Padding-free packing: several tokenized examples per row, kept apart by restarting position ids.

A padded batch spends compute on padding tokens (up to half of it when lengths vary). Packing puts
examples end to end instead and tells the model where each one starts through ``position_ids`` that
restart at 0; with no ``attention_mask``, transformers (checked on 5.23) derives a
block-diagonal causal mask from those position ids (``masking_utils.find_packed_sequence_indices``)
for the ``sdpa``, ``eager`` and ``flex_attention`` implementations, and the flash-attention kernels
switch to their variable-length form (batch size 1 only). So every example sees only its own tokens
and positions, exactly as if it were alone.

Two things must hold for that to be exact, and both are handled here or in ``training.loss``:

* no position predicts a token of the next example: labels are unshifted (position ``t`` predicts
  ``labels[t+1]``), so the first token of every example is set to IGNORE_INDEX. Nothing predicted it
  when the example stood alone either, so the loss is unchanged;
* the model must not be given a KV cache (transformers skips packed-sequence detection when it has
  one): the loss passes ``use_cache=False``.

Grouping is greedy in the given order (next-fit): the epoch's shuffle decides which examples share a
row, so the data order stays meaningful and a row never reorders examples. First-fit-decreasing would
fill rows a little better but sorts by length, which correlates rows with length and makes every
epoch's rows the same up to order. Why hand-written: transformers' ``DataCollatorWithFlattening`` makes
one flat row of a whole batch (no token budget, no multi-row batches, no boundary handling of
unshifted labels) and TRL's packing works on its own dataset objects; this is a few dozen lines.
"""

from __future__ import annotations

import torch

from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunelab.errors import TunelabError

# Attention implementations that turn restarting position ids (and no attention mask) into
# per-example attention. sdpa/eager/flex_attention: transformers builds the block-diagonal mask
# (verified on CPU, tests/unit/test_packing.py). flash_attention_*: varlen kernels, batch size 1 only.
MASKED_PACKING_ATTENTION = frozenset({"sdpa", "eager", "flex_attention"})
VARLEN_PACKING_ATTENTION = frozenset({"flash_attention_2", "flash_attention_3", "flash_attention_4"})


def pack_examples(examples: list[TokenizedExample], max_tokens: int) -> list[list[int]]:
    """Group example indices into rows of at most ``max_tokens`` tokens, greedily in the given order.

    An example is added to the current row while it fits, otherwise it starts a new row (next-fit). An
    example longer than ``max_tokens`` gets a row of its own. Deterministic; every index appears once
    and indices stay in increasing order within and across rows.

    Args:
        examples: Tokenized examples, in the order to pack them (e.g. the epoch's shuffle).
        max_tokens: Token budget of a row.

    Returns:
        Rows of indices into ``examples``.
    """
    if max_tokens < 1:
        raise TunelabError(f"packing: the token budget of a row must be positive, got {max_tokens}")
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, example in enumerate(examples):
        n = len(example.input_ids)
        if current and used + n > max_tokens:
            rows.append(current)
            current, used = [], 0
        current.append(index)
        used += n
        if used >= max_tokens:  # full, or a single over-long example: close it
            rows.append(current)
            current, used = [], 0
    if current:
        rows.append(current)
    return rows


def collate_packed(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """One packed row (batch size 1) of the examples, end to end, with no padding.

    Args:
        examples: The examples of the row, in order.
        pad_id: Unused for a single row (there is no padding); kept for the same call shape as
            :func:`tunelab.data.collate.collate`.

    Returns:
        ``input_ids``, ``labels`` and ``position_ids``, all ``torch.long`` of shape ``(1, T)`` with ``T``
        the examples' total length, and no ``attention_mask``: ``position_ids`` restart at 0 for every
        example and the label of every example's first token is IGNORE_INDEX, so no position predicts
        across a boundary.
    """
    return collate_packed_rows([examples], pad_id)


def collate_packed_rows(rows: list[list[TokenizedExample]], pad_id: int) -> dict[str, torch.Tensor]:
    """Several packed rows, right-padded to the longest; the padding is a "sequence" of its own.

    Padding positions get ``pad_id``, IGNORE_INDEX labels and position ids that restart at 0, so they
    form a separate block that no real token attends to (it is also after every real token, so the
    causal mask alone would keep it out). Only for ``sdpa``/``eager``/``flex_attention``: the
    flash-attention kernels detect packing only at batch size 1 (see :func:`check_packed_attention`).

    Args:
        rows: Each row's examples, in order (e.g. from :func:`pack_examples`).
        pad_id: Id written into padding positions of ``input_ids``.

    Returns:
        ``input_ids``, ``labels``, ``position_ids``, all ``torch.long`` of shape ``(B, T)`` with ``B`` the
        number of rows and ``T`` the longest row; no ``attention_mask``.
    """
    if not rows or any(not row for row in rows):
        raise ValueError("collate_packed_rows needs at least one row and no empty row")
    lengths = [sum(len(ex.input_ids) for ex in row) for row in rows]
    width = max(lengths)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for ex in row:
            n = len(ex.input_ids)
            input_ids[r, start : start + n] = torch.tensor(ex.input_ids, dtype=torch.long)
            labels[r, start : start + n] = torch.tensor(ex.labels, dtype=torch.long)
            labels[r, start] = IGNORE_INDEX  # the previous example's last token must not predict this one
            position_ids[r, start : start + n] = torch.arange(n)
            start += n
        position_ids[r, start:] = torch.arange(width - start)  # padding: its own sequence, from 0
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def packed_micro_batch(examples: list[TokenizedExample], pad_id: int, max_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """The examples of one micro-batch as packed rows: the same examples, less (or no) padding.

    With ``max_tokens=None`` all examples go into one row (batch size 1, no padding at all): best with
    flash-attention kernels, whose cost does not grow with the row's length squared. With a budget
    (e.g. ``data.max_length``) they are packed greedily into rows of at most that many tokens, which
    keeps the (T x T) attention mask that sdpa/eager build small.

    The gradient is that of the unpacked micro-batch (same examples, same trained tokens), so a
    training loop can switch packing on without changing steps, data order or loss normalisation.
    """
    if not examples:
        raise ValueError("packed_micro_batch needs at least one example")
    if max_tokens is None:
        return collate_packed(examples, pad_id)
    rows = [[examples[i] for i in row] for row in pack_examples(examples, max_tokens)]
    return collate_packed_rows(rows, pad_id)


def row_budget(examples: list[TokenizedExample], attn_implementation: str | None) -> int | None:
    """The row budget for :func:`packed_micro_batch` that never costs more than padding the same examples.

    Flash-attention kernels (varlen) cost nothing per extra row length: one row (None). sdpa, eager and
    flex build a (T x T) mask and compute every block of it, so a row's attention costs its length
    squared; rows no longer than the longest example keep both the token slots and the attention work
    at or below those of the padded batch (sum of r_i^2 <= W * sum of r_i <= B * W^2), and save the
    most when lengths vary. Measured in bench/NOTES.md: one row of eight ~440-token examples made
    forward+backward 2.3x slower on CPU sdpa.
    """
    if attn_implementation in VARLEN_PACKING_ATTENTION:
        return None
    return max(len(ex.input_ids) for ex in examples)


def check_packed_attention(model, rows: int = 1) -> str:
    """Refuse attention implementations that would let packed examples see each other.

    Args:
        model: The model (PEFT-wrapped or not) that will get packed batches.
        rows: Rows per packed batch.

    Returns:
        The attention implementation name.

    Raises:
        TunelabError: If the implementation does not separate packed examples (or only at batch size 1
            and ``rows > 1``).
    """
    config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)  # DDP wraps
    impl = getattr(config, "_attn_implementation", None)
    if impl in MASKED_PACKING_ATTENTION:
        return impl
    if impl in VARLEN_PACKING_ATTENTION:
        if rows > 1:
            raise TunelabError(
                f"packing: {impl} separates packed examples only with one row per batch, got {rows} rows; "
                "pack each micro-batch into a single row (no row budget) or use attn_implementation sdpa"
            )
        return impl
    raise TunelabError(
        f"packing: attention implementation {impl!r} is not known to keep packed examples apart; "
        f"load the model with one of {', '.join(sorted(MASKED_PACKING_ATTENTION | VARLEN_PACKING_ATTENTION))}, "
        "or set train.packing=false"
    )



def collator(model, *, packing: bool):
    """The collate function of a run: padded rows (:func:`tunelab.data.collate`), or for ``train.packing``
    rows no longer than the micro-batch's longest example (so packing never costs more than padding), one
    row for flash-attention's variable-length kernels."""
    if not packing:
        from tunelab.data.collate import collate

        return collate
    attention = getattr(model.config, "_attn_implementation", "sdpa")
    return lambda examples, pad_id: packed_micro_batch(examples, pad_id, row_budget(examples, attention))
