"""Choose the chat template that turns messages into text, and make the tokenizer ready for it.

Base models often ship without a chat template; instruction-tuned ones bring their own. ``auto`` keeps
the model's own template (so the fine-tune matches how the model was trained) and falls back to ChatML.
"""

from __future__ import annotations

from pathlib import Path

import jinja2

from tunelab.errors import TunelabError
from tunelab.models.tiny import CHATML_TEMPLATE

NAMED_TEMPLATES: dict[str, str] = {"chatml": CHATML_TEMPLATE}
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
_CHOICES = (
    "'auto' (the tokenizer's own, else chatml), 'tokenizer' (require its own), "
    f"{', '.join(repr(n) for n in NAMED_TEMPLATES)}, a path to a .jinja file, or an inline Jinja template"
)


def prepare_tokenizer(tokenizer, chat_template: str = "auto") -> list[str]:
    """Set ``tokenizer.chat_template`` and make sure the tokenizer has a pad token.

    When a template other than the tokenizer's own is applied and it uses ChatML markers the tokenizer
    lacks, those are added as special tokens; if ``<|im_end|>`` had to be added it also becomes the eos
    token, so generation stops at the end of the assistant's turn. A missing pad token is set to eos
    (padding positions are masked by the collator, so sharing the id is harmless).

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
    template, keep_own = _resolve(chat_template, own)
    added: list[str] = []
    if not keep_own:
        _check_syntax(template, chat_template)
        tokenizer.chat_template = template
        added = _add_missing_tokens(tokenizer, [t for t in CHATML_TOKENS if t in template])
        if "<|im_end|>" in added:
            tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TunelabError(
                "the tokenizer has neither a pad nor an eos token; use a model whose tokenizer defines eos"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return added


def _resolve(choice: str, own: str | None) -> tuple[str, bool]:
    """The template for a ``data.chat_template`` choice, and whether it is the tokenizer's own."""
    if choice in ("auto", "tokenizer") and own is not None:
        return own, True
    if choice == "auto":
        return CHATML_TEMPLATE, False
    if choice == "tokenizer":
        raise TunelabError(
            "data.chat_template is 'tokenizer' but this model's tokenizer has no chat template; "
            "pick a fallback, e.g. data.chat_template=chatml"
        )
    if choice in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[choice], False
    path = Path(choice)
    if choice.endswith(".jinja") or (len(choice) < 4096 and "\n" not in choice and path.is_file()):
        try:
            return path.read_text(encoding="utf-8"), False
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
