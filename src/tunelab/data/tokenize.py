"""Turn chat examples into token ids and loss labels, for any chat template.

The loss mask is found from the rendered text, not by guessing token patterns:

1. Render the whole conversation with ``tokenizer.apply_chat_template``.
2. Render each prefix ``messages[:i+1]``; message ``i`` owns the characters between the end of the
   previous prefix and the end of its own. Every prefix render must be a prefix of the full render,
   otherwise the template rewrites earlier turns and no reliable mask exists (we refuse, naming the
   example). Text a template emits before the first message (BOS, an injected default system prompt)
   belongs to the pseudo-role ``"template"``.
3. An assistant answer is trained from the end of ``render(messages[:i], add_generation_prompt=True)``
   (so its header is not trained) to the end of its prefix with trailing whitespace stripped, so the
   end-of-turn token is trained (the model must learn to stop) but the newline after it is not.
4. Tokenize the full text once with offsets; a token is trained if it overlaps a trained span. That
   is the same as "its first character is in the span" except for a token straddling the span's start
   (``" Hello"`` after a generation prompt ending in ``"Response:"``), which must be trained too.

Conversations with tools are first turned into what the template is given (:func:`tunelab.data.tool_render.chat_view`:
the messages as they are for a template that renders tools, else the fallback's plain turns); tool results
and the tools listing are never trained. A template may join consecutive tool results into one turn, so no
cut is made between them (they form one region, labelled ``"tool"``).

If a template ends an assistant turn with plain text rather than a special token, the model would
never see where to stop; in that case ``eos_token_id`` is inserted right after the answer's last token
(as a trained token) so generation ends there.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

from tunelab.data.reasoning import answer_start, has_reasoning
from tunelab.data.records import Example
from tunelab.data.tool_render import chat_view, renders_tools, uses_tools
from tunelab.data.tools import TOOL_ROLE
from tunelab.errors import DataError, TunelabError

IGNORE_INDEX = -100
LOSS_ON = ("assistant", "last_turn", "all")
TOO_LONG = ("truncate", "drop", "error")
TEMPLATE_ROLE = "template"


@dataclass
class TokenizedExample:
    """Token ids and labels of one example.

    Attributes:
        input_ids: The token ids.
        labels: ``input_ids`` where the loss is taken and -100 elsewhere; not shifted (the loss shifts).
        source: The example's ``"path:line"``.
    """

    input_ids: list[int]
    labels: list[int]
    source: str


@dataclass
class TokenizeStats:
    """What tokenization produced, for the user to check before spending compute."""

    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: list[str] = field(default_factory=list)
    tokens_by_role: dict[str, int] = field(default_factory=dict)
    trained_by_role: dict[str, int] = field(default_factory=dict)
    max_len: int = 0
    mean_len: float = 0.0
    tool_calls: int = 0  # assistant tool calls in the kept examples
    tool_rendering: str = ""  # "native" (the template renders tools) or "fallback", when any example has tools


@dataclass
class _Encoded:
    """An example's tokens with, per token, whether it is trained and which role it belongs to."""

    ids: list[int]
    trained: list[bool]
    roles: list[str]


def tokenize_examples(
    examples: list[Example],
    tokenizer,
    *,
    loss_on: str = "assistant",
    max_length: int = 1024,
    too_long: str = "truncate",
    reasoning: bool = True,
) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize examples with the tokenizer's chat template and mask what is not trained.

    Args:
        examples: Validated examples from :func:`tunelab.data.load_examples`.
        tokenizer: A fast ``transformers`` tokenizer with a chat template (see ``prepare_tokenizer``).
        loss_on: ``assistant`` (every answer), ``last_turn`` (only the final answer) or ``all`` tokens.
        max_length: Longest allowed sequence in tokens.
        too_long: ``truncate`` (keep the first ``max_length`` tokens; drop the example if no trained
            token survives), ``drop``, or ``error``.
        reasoning: Train an answer's reasoning too (``data.train_on_reasoning``; see :mod:`tunelab.data.reasoning`).

    Returns:
        The kept examples and statistics over them (dropped sources are listed in the stats).

    Raises:
        DataError: With ``too_long="error"``, listing every example longer than ``max_length``.
        TunelabError: For bad options, a slow tokenizer, or a template that cannot be masked.
    """
    _check_options(tokenizer, loss_on, too_long, max_length)
    special = _special_ids(tokenizer)
    kept, stats, too_long_problems = [], TokenizeStats(), []
    for example, enc in zip(examples, _encode_all(examples, tokenizer, loss_on, special, reasoning)):
        if len(enc.ids) > max_length:
            if too_long == "error":
                too_long_problems.append(f"{example.source}: {len(enc.ids)} tokens > data.max_length={max_length}; "
                                         "raise data.max_length, or set data.too_long to truncate or drop")
                continue
            enc = _truncate(enc, max_length) if too_long == "truncate" else None
            if enc is None:
                stats.dropped.append(example.source)
                continue
            stats.truncated += 1
        labels = [t if on else IGNORE_INDEX for t, on in zip(enc.ids, enc.trained)]
        kept.append(TokenizedExample(enc.ids, labels, example.source))
        _count(stats, enc, example, tokenizer)
    if too_long_problems:
        raise DataError(too_long_problems, what="tokenized data")
    stats.examples = len(kept)
    stats.mean_len = stats.tokens / len(kept) if kept else 0.0
    return kept, stats


def _truncate(enc: _Encoded, max_length: int) -> _Encoded | None:
    """The first ``max_length`` tokens, or None if none of them is trained (nothing left to learn)."""
    if not any(enc.trained[:max_length]):
        return None
    return _Encoded(enc.ids[:max_length], enc.trained[:max_length], enc.roles[:max_length])


def render_example(example: Example, tokenizer, loss_on: str = "assistant", reasoning: bool = True) -> list[tuple[str, bool]]:
    """The example's text split into runs of trained and untrained tokens, for display.

    Consecutive tokens with the same flag are decoded together, so multi-byte characters split across
    tokens still read correctly. No truncation is applied.

    Returns:
        ``(text, trained)`` pairs covering the whole tokenized example in order.
    """
    _check_options(tokenizer, loss_on, "truncate", 1)
    enc = _encode(example, tokenizer, loss_on, _special_ids(tokenizer), reasoning)
    runs: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(enc.ids) + 1):
        if i == len(enc.ids) or enc.trained[i] != enc.trained[start]:
            piece = tokenizer.decode(enc.ids[start:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            runs.append((piece, enc.trained[start]))
            start = i
    return runs


def _check_options(tokenizer, loss_on: str, too_long: str, max_length: int) -> None:
    """Refuse bad arguments up front, before any work."""
    if loss_on not in LOSS_ON:
        raise TunelabError(f"unknown data.loss_on {loss_on!r}; choose one of: {', '.join(LOSS_ON)}")
    if too_long not in TOO_LONG:
        raise TunelabError(f"unknown data.too_long {too_long!r}; choose one of: {', '.join(TOO_LONG)}")
    if max_length < 1:
        raise TunelabError(f"data.max_length must be positive, got {max_length}")
    if not getattr(tokenizer, "is_fast", False):
        raise TunelabError(
            "the loss mask needs a fast tokenizer (character offsets); this model only has a slow one. "
            "Install `tokenizers` or convert the tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    if not tokenizer.chat_template:
        raise TunelabError("the tokenizer has no chat template; call prepare_tokenizer (data.chat_template) first")


def _special_ids(tokenizer) -> set[int]:
    """Ids of every special token, including ones added with ``add_tokens(special_tokens=True)``."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return ids


def _render(tokenizer, messages: list[dict], source: str, generation: bool = False, tools: list | None = None) -> str:
    """Apply the chat template to messages, turning template failures into user errors."""
    extra = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **extra)
    except Exception as e:  # templates raise their own errors (raise_exception, TemplateError, TypeError)
        raise TunelabError(
            f"{source}: the chat template failed on this conversation: {e}; "
            "fix the conversation or use data.chat_template=chatml"
        ) from e


def _require_prefix(prefix: str, full: str, source: str, cut: int) -> None:
    """Masks are only reliable if rendering fewer messages yields a prefix of the full text."""
    if not full.startswith(prefix):
        raise TunelabError(
            f"{source}: the chat template renders the conversation cut after message {cut} differently "
            "from the start of the whole conversation (it rewrites earlier turns), so the trained tokens "
            "cannot be located; use data.chat_template=chatml"
        )


def _first_start(tokenizer, first: dict, end: int, full: str, tools: list | None = None) -> int:
    """Where the first message begins, so text the template emits before it is attributed to "template".

    Rendering ``[]`` is not safe (templates index ``messages[0]``), so the first message is rendered
    twice: the second copy shows how long one such message is, and it must match the end of the single
    render. Templates that refuse repeated roles fall back to 0 (only per-role statistics are affected).
    """
    try:
        doubled = tokenizer.apply_chat_template([first, first], tokenize=False, **({"tools": tools} if tools else {}))
    except Exception:
        return 0
    length = len(doubled) - end
    start = end - length
    if 0 < length and start >= 0 and doubled[:end] == full[:end] and doubled[end:] == full[start:end]:
        return start
    return 0


def _layout(example: Example, tokenizer, loss_on: str,
            reasoning: bool = True) -> tuple[str, list[tuple[int, int, str]], list[tuple[int, int]]]:
    """The rendered text, each region's character span with its role, and the answers' trained spans.

    A region is one message, or a run of consecutive tool results. With ``loss_on="all"`` the answer spans
    are still returned (every assistant message) so that each answer's end-of-turn token can be checked.
    A conversation with reasoning that the template rewrites (it strips earlier turns' reasoning) trains its
    final answer only; ``reasoning=False`` leaves each answer's reasoning block out of its span.
    """
    messages, labels, tools = chat_view(example.messages, example.tools, tokenizer)
    source = example.source
    full = _render(tokenizer, messages, source, tools=tools)
    units = _units(labels)
    rewrites = has_reasoning(messages)  # such a template may rewrite earlier turns: cut where it does not
    ends: list[int | None] = []
    for _, last in units[:-1]:
        prefix = _render(tokenizer, messages[: last + 1], source, tools=tools)
        if not (rewrites and not full.startswith(prefix)):
            _require_prefix(prefix, full, source, last + 1)
        ends.append(len(prefix) if full.startswith(prefix) else None)
    ends.append(len(full))
    regions, starts = _regions(tokenizer, messages, labels, units, ends, full, tools)
    answers = [k for k, (first, _) in enumerate(units) if labels[first] == "assistant"]
    if loss_on == "last_turn" or None in ends:
        answers = answers[-1:]
    spans = []
    for k in answers:
        i, head = units[k][0], starts[k]
        if i > 0:
            prompt = _render(tokenizer, messages[:i], source, generation=True, tools=tools)
            _require_prefix(prompt, full, source, i)
            head = len(prompt)
        # Stripping keeps the end-of-turn token in the span but not the newline a template puts after it.
        end = len(full[: ends[k]].rstrip())
        if not reasoning:
            head = answer_start(full, head, end)
        if end > head:
            spans.append((head, end))
    return full, regions, spans


def _regions(tokenizer, messages, labels, units, ends, full, tools) -> tuple[list[tuple[int, int, str]], list[int]]:
    """Each region's (start, end, role) and each unit's start; a unit whose end cannot be located (the template
    rewrote it) is merged into the next region, which keeps the first one's role."""
    first_end = next(e for e in ends if e is not None)
    starts, regions, start = [], [], _first_start(tokenizer, messages[0], first_end, full, tools) if ends[0] else 0
    label = None
    for end, (first, _) in zip(ends, units):
        starts.append(start)
        label = label or labels[first]
        if end is not None:
            regions.append((start, end, label))
            start, label = end, None
    return regions, starts


def _units(labels: list[str]) -> list[tuple[int, int]]:
    """(first, last) message index of each region: one message, or a run of consecutive tool results."""
    units: list[tuple[int, int]] = []
    for i, label in enumerate(labels):
        if units and label == TOOL_ROLE and labels[i - 1] == TOOL_ROLE:
            units[-1] = (units[-1][0], i)
        else:
            units.append((i, i))
    return units


ENCODE_BATCH = 512  # texts per call to the Rust tokenizer, which encodes a batch on all cores


def _encode_all(examples: list[Example], tokenizer, loss_on: str, special: set[int], reasoning: bool = True):
    """:func:`_encode` for many examples, tokenizing them in batches (the layouts are rendered first)."""
    for first in range(0, len(examples), ENCODE_BATCH):
        layouts = [_layout(example, tokenizer, loss_on, reasoning) for example in examples[first : first + ENCODE_BATCH]]
        batch = tokenizer([text for text, _, _ in layouts], add_special_tokens=False, return_offsets_mapping=True)
        for layout, ids, offsets in zip(layouts, batch["input_ids"], batch["offset_mapping"]):
            yield _mask(layout, ids, offsets, tokenizer, loss_on, special)


def _encode(example: Example, tokenizer, loss_on: str, special: set[int], reasoning: bool = True) -> _Encoded:
    """Tokenize one example and flag each token as trained or not, with its role."""
    layout = _layout(example, tokenizer, loss_on, reasoning)
    enc = tokenizer(layout[0], add_special_tokens=False, return_offsets_mapping=True)
    return _mask(layout, enc["input_ids"], enc["offset_mapping"], tokenizer, loss_on, special)


def _mask(layout, input_ids, offset_mapping, tokenizer, loss_on: str, special: set[int]) -> _Encoded:
    """Flag each token of a tokenized layout as trained or not, with its role (and add EOS where needed)."""
    _, regions, answer_spans = layout
    ids: list[int] = list(input_ids)
    offsets = [start for start, _ in offset_mapping]
    token_ends = [end for _, end in offset_mapping]
    region_starts = [s for s, _, _ in regions]
    roles = []
    for pos in offsets:
        k = bisect_right(region_starts, pos) - 1
        roles.append(regions[k][2] if k >= 0 and pos < regions[k][1] else TEMPLATE_ROLE)
    trained = [loss_on == "all"] * len(ids)
    answer_ends = []  # index of each answer's last token, to check it ends with a special token
    for head, end in answer_spans:
        # Offsets are non-decreasing, so the tokens overlapping the span form a contiguous range. A token
        # straddling the span's start (" Hello" after "Response:") is trained: it is what the model
        # must produce right after the generation prompt.
        first, stop = bisect_right(token_ends, head), bisect_left(offsets, end)
        trained[first:stop] = [True] * (stop - first)
        if stop > first:
            answer_ends.append(stop - 1)
    eos = tokenizer.eos_token_id
    # Insert from the back so earlier indices stay valid.
    for j in sorted(answer_ends, reverse=True):
        if ids[j] not in special and eos is not None:
            ids.insert(j + 1, eos)
            trained.insert(j + 1, True)
            roles.insert(j + 1, "assistant")
    return _Encoded(ids, trained, roles)


def _count(stats: TokenizeStats, enc: _Encoded, example: Example, tokenizer) -> None:
    """Add one kept example to the statistics."""
    if uses_tools(example.messages, example.tools):
        stats.tool_calls += sum(len(m.get("tool_calls") or ()) for m in example.messages)
        stats.tool_rendering = "native" if renders_tools(tokenizer) else "fallback"
    stats.tokens += len(enc.ids)
    stats.max_len = max(stats.max_len, len(enc.ids))
    for role, on in zip(enc.roles, enc.trained):
        stats.tokens_by_role[role] = stats.tokens_by_role.get(role, 0) + 1
        if on:
            stats.trained_tokens += 1
            stats.trained_by_role[role] = stats.trained_by_role.get(role, 0) + 1


def encode_with_flags(example: Example, tokenizer, loss_on: str = "assistant", reasoning: bool = True) -> tuple[str, list[int], list[bool]]:
    """The rendered text of one example, its token ids and, per token, whether it is trained (no truncation):
    the trained-span logic above, for callers that tokenize the text further (a VLM processor expanding images)."""
    _check_options(tokenizer, loss_on, "truncate", 1)
    layout = _layout(example, tokenizer, loss_on, reasoning)
    enc = tokenizer(layout[0], add_special_tokens=False, return_offsets_mapping=True)
    masked = _mask(layout, enc["input_ids"], enc["offset_mapping"], tokenizer, loss_on, _special_ids(tokenizer))
    return layout[0], masked.ids, masked.trained
