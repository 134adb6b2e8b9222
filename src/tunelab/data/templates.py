"""Choose the chat template that turns messages into text, and make the tokenizer ready for it.

Base models often ship without a chat template; instruction-tuned ones bring their own. ``auto`` keeps
the model's own template (so the fine-tune matches how the model was trained); without one it uses the
template of the family whose turn markers the vocabulary already has (Gemma's ``<start_of_turn>``, or
ChatML's ``<|im_start|>``), so no token has to be added, and only then falls back to ChatML with added
markers.
"""

from __future__ import annotations

from pathlib import Path

import jinja2

from tunelab.errors import TunelabError
from tunelab.models.tiny import CHATML_TEMPLATE
from tunelab.safeyaml import read_text

# Gemma's turn format. The assistant role is called "model"; Gemma has no system role, so a leading system
# message is folded into the first user turn (separated by a blank line). The system text is emitted while
# rendering the system message itself, so rendering fewer messages always gives a prefix of the whole
# conversation (the loss mask relies on it), and a system message not followed by a user turn closes its
# own turn. The template writes <bos> itself: tunelab tokenizes rendered text without special tokens.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(open=false) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and loop.first %}"
    "{{ '<start_of_turn>user\n' + message['content'] | trim + '\n\n' }}{% set ns.open = true %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else ('user' if message['role'] == 'system' else message['role']) %}"
    "{% if ns.open and role != 'user' %}{{ '<end_of_turn>\n' }}{% endif %}"
    "{% if not (ns.open and role == 'user') %}{{ '<start_of_turn>' + role + '\n' }}{% endif %}"
    "{{ message['content'] | trim + '<end_of_turn>\n' }}{% set ns.open = false %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if ns.open %}{{ '<end_of_turn>\n' }}{% endif %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

NAMED_TEMPLATES: dict[str, str] = {"chatml": CHATML_TEMPLATE, "gemma": GEMMA_TEMPLATE}
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# Each family's (turn start, turn end) markers, in the order ``auto`` tries them.
FAMILY_MARKERS: dict[str, tuple[str, str]] = {"chatml": CHATML_TOKENS, "gemma": ("<start_of_turn>", "<end_of_turn>")}
_CHOICES = (
    "'auto' (the tokenizer's own, else the family template whose turn markers the vocabulary has, else chatml), "
    f"'tokenizer' (require its own), {', '.join(repr(n) for n in NAMED_TEMPLATES)}, a path to a .jinja file, "
    "or an inline Jinja template"
)


def prepare_tokenizer(tokenizer, chat_template: str = "auto") -> list[str]:
    """Set ``tokenizer.chat_template`` and make sure the tokenizer has a pad token.

    When a template other than the tokenizer's own is applied and it uses ChatML markers the tokenizer
    lacks, those are added as special tokens. When a template other than the tokenizer's own ends turns
    with a family's end marker (``<|im_end|>``, ``<end_of_turn>``), that marker becomes the eos token, so
    generation stops at the end of the assistant's turn. A missing pad token is set to eos (padding
    positions are masked by the collator, so sharing the id is harmless).

    Args:
        tokenizer: A ``transformers`` tokenizer; modified in place.
        chat_template: ``auto``, ``tokenizer``, a name in :data:`NAMED_TEMPLATES`, a ``.jinja`` file path,
            or a literal Jinja template (recognised by ``{%`` or ``{{``).

    Returns:
        The tokens added to the vocabulary (the caller must resize the model's embeddings), or ``[]``.

    Raises:
        TunelabError: If the choice is unknown, the file is missing, or the template is not valid Jinja.
    """
    own = tokenizer.chat_template or None
    template, keep_own = _resolve(chat_template, own, tokenizer)
    added: list[str] = []
    if not keep_own:
        _check_syntax(template, chat_template)
        tokenizer.chat_template = template
        added = _add_missing_tokens(tokenizer, [t for t in CHATML_TOKENS if t in template])
        end = next((end for _, end in FAMILY_MARKERS.values() if end in template and _is_one_token(tokenizer, end)), None)
        if end is not None and tokenizer.eos_token != end:
            tokenizer.eos_token = end
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TunelabError(
                "the tokenizer has neither a pad nor an eos token; use a model whose tokenizer defines eos"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return added


def turn_markers(tokenizer) -> list[str]:
    """The family turn markers (:data:`FAMILY_MARKERS`) the tokenizer's chat template uses, each one token of its vocabulary."""
    template = tokenizer.chat_template or ""
    return [m for markers in FAMILY_MARKERS.values() for m in markers if m in template and _is_one_token(tokenizer, m)]


def vocabulary_family(tokenizer) -> str | None:
    """The first template family (:data:`FAMILY_MARKERS`) whose turn markers are each one token of the vocabulary."""
    for name, markers in FAMILY_MARKERS.items():
        if all(_is_one_token(tokenizer, marker) for marker in markers):
            return name
    return None


def _is_one_token(tokenizer, text: str) -> bool:
    """Whether ``text`` is in the vocabulary and encodes as that single token (not split into pieces)."""
    token_id = tokenizer.get_vocab().get(text)
    return token_id is not None and tokenizer(text, add_special_tokens=False).input_ids == [token_id]


def template_file(choice: str) -> Path | None:
    """The file a ``data.chat_template`` value names, if it names an existing file (an inline template
    does not: it has newlines, or is a string no file system accepts as a name: too long, NUL)."""
    if "\n" in choice:
        return None
    path = Path(choice)
    try:
        return path if path.is_file() else None
    except (OSError, ValueError):
        return None


def _resolve(choice: str, own: str | None, tokenizer) -> tuple[str, bool]:
    """The template for a ``data.chat_template`` choice, and whether it is the tokenizer's own."""
    if choice in ("auto", "tokenizer") and own is not None:
        return own, True
    if choice == "auto":
        return NAMED_TEMPLATES[vocabulary_family(tokenizer) or "chatml"], False
    if choice == "tokenizer":
        raise TunelabError(
            "data.chat_template is 'tokenizer' but this model's tokenizer has no chat template; "
            "pick a fallback, e.g. data.chat_template=chatml"
        )
    if choice in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[choice], False
    path = template_file(choice) or Path(choice)
    if choice.endswith(".jinja") or template_file(choice):
        try:
            return read_text(path), False  # a regular file of at most 1 MiB: not a link to /dev/zero
        except (OSError, UnicodeDecodeError) as e:
            raise TunelabError(f"data.chat_template: cannot read template file {choice}: {e}") from e
    if "{%" in choice or "{{" in choice:
        return choice, False
    raise TunelabError(f"data.chat_template {choice!r} is not a known template; choose {_CHOICES}")


def _check_syntax(template: str, choice: str) -> None:
    """Fail now, with the template's origin, rather than deep inside tokenization."""
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        origin = choice if len(choice) < 80 else "(inline template)"
        raise TunelabError(f"data.chat_template {origin}: invalid Jinja on line {e.lineno}: {e.message}") from e


def _add_missing_tokens(tokenizer, tokens: list[str]) -> list[str]:
    """Add the tokens the vocabulary lacks as special tokens (so they are never split); return them."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return missing
