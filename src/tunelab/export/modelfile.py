"""An Ollama ``Modelfile`` for an exported GGUF: its TEMPLATE follows the training chat template.

Hand-written because Ollama reads Go templates, not the Jinja chat template transformers trained with,
and no library translates one into the other. Rather than parse Jinja, the training template is rendered
on marker conversations and the text around each marker is read off: what comes before and after a
system, user and assistant message, what a conversation without a system message starts with (SmolLM2
adds a default system prompt), and the generation prompt. Those pieces fill a fixed Go template. The
same pieces rendered in Python (``render_pieces``, what the Go template computes) are checked against the
Jinja rendering of test conversations; ``template_parity`` says whether they agree, and a template that
cannot be expressed this way is left out of the Modelfile (Ollama then falls back to its own guess).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_MARK = {"system": "TLXSYSTEMMARK", "user": "TLXUSERMARK", "assistant": "TLXASSISTANTMARK"}
_SECOND_USER = "TLXSECONDUSERMARK"


@dataclass
class Pieces:
    """Literal text around each message under the chat template."""

    head_with_system: str  # before the system message when a conversation starts with one
    head_without_system: str  # before the first message otherwise (e.g. a default system prompt)
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str


def _render(tokenizer: Any, messages: list[dict], generation: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _between(text: str, start: str, end: str | None) -> str:
    after = text.split(start, 1)[1]
    return after.split(end, 1)[0] if end else after


def _strip_prefix(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(f"{text!r} does not start with {prefix!r}")
    return text[len(prefix):]


def _strip_suffix(text: str, suffix: str) -> str:
    if suffix and not text.endswith(suffix):
        raise ValueError(f"{text!r} does not end with {suffix!r}")
    return text[: len(text) - len(suffix)] if suffix else text


def derive_pieces(tokenizer: Any) -> Pieces:
    """Read the per-role text pieces off the tokenizer's chat template.

    Raises:
        ValueError: The template does not render as fixed text around each message.
    """
    u, a, s, u2 = _MARK["user"], _MARK["assistant"], _MARK["system"], _SECOND_USER
    one = _render(tokenizer, [{"role": "user", "content": u}])
    two = _render(tokenizer, [{"role": "user", "content": u}, {"role": "assistant", "content": a}])
    three = _render(tokenizer, [{"role": "user", "content": u}, {"role": "assistant", "content": a},
                                {"role": "user", "content": u2}])
    suffix = {"user": _between(one, u, None), "assistant": _between(two, a, None)}
    prefix = {"assistant": _strip_prefix(_between(two, u, a), suffix["user"]),
              "user": _strip_prefix(_between(three, a, u2), suffix["assistant"])}
    bos = tokenizer.bos_token or ""
    head_without = _strip_suffix(one.split(u, 1)[0], prefix["user"])
    system = _render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u}])
    before_system = system.split(s, 1)[0]
    # a bos the template writes once in front (Llama 3), not one that starts every turn (SmolLM2's <|im_start|>)
    lead_s = bos if bos and before_system.startswith(bos) and not prefix["user"].startswith(bos) else ""
    suffix["system"] = _strip_suffix(_between(system, s, u), prefix["user"])
    prefix["system"] = before_system[len(lead_s):]
    generation = _strip_prefix(_render(tokenizer, [{"role": "user", "content": u}], True), one)
    return Pieces(lead_s, head_without, prefix, suffix, generation)


def render_pieces(pieces: Pieces, messages: list[dict], generation: bool) -> str:
    """What the Go template of :func:`go_template` renders for ``messages`` (its Python mirror)."""
    starts_with_system = bool(messages) and messages[0]["role"] == "system"
    text = pieces.head_with_system if starts_with_system else pieces.head_without_system
    for m in messages:
        text += pieces.prefix[m["role"]] + m["content"] + pieces.suffix[m["role"]]
    if generation and messages and messages[-1]["role"] != "assistant":
        text += pieces.generation
    return text


_CHECKS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Answer in SQL."}, {"role": "user", "content": "Count the rows."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
]


def template_parity(tokenizer: Any, pieces: Pieces) -> bool:
    """Whether the pieces reproduce the Jinja rendering of a few conversations, with and without generation prompt."""
    return all(render_pieces(pieces, c, g) == _render(tokenizer, c, g) for c in _CHECKS for g in (False, True))


def go_template(pieces: Pieces, strip: str = "") -> str:
    """The Ollama (Go text/template) TEMPLATE for the pieces; ``strip`` (a bos token Ollama adds itself) is removed."""
    def lit(text: str) -> str:
        return text.replace(strip, "", 1) if strip and text.startswith(strip) else text

    roles = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq $m.Role "{r}" }}}}{pieces.prefix[r]}{{{{ $m.Content }}}}'
                    f"{pieces.suffix[r]}" for i, r in enumerate(("system", "user", "assistant")))
    return (f'{{{{ if and .Messages (eq (index .Messages 0).Role "system") }}}}{lit(pieces.head_with_system)}'
            f"{{{{ else }}}}{lit(pieces.head_without_system)}{{{{ end }}}}"
            f"{{{{ range $i, $m := .Messages }}}}{roles}{{{{ end }}}}"
            f'{{{{ if and (eq (len (slice $.Messages $i)) 1) (ne $m.Role "assistant") }}}}{pieces.generation}{{{{ end }}}}'
            "{{ end }}")  # closes the range


def modelfile_text(gguf_name: str, tokenizer: Any, stop_tokens: list[str], adds_bos: bool) -> tuple[str, bool]:
    """(the Modelfile, whether its TEMPLATE reproduces the training chat template on the check conversations)."""
    lines = ["# Written by `tunelab export`; TEMPLATE and stops follow the chat template used in training.",
             f"FROM ./{gguf_name}"]
    parity = False
    if getattr(tokenizer, "chat_template", None):
        try:
            pieces = derive_pieces(tokenizer)
            parity = template_parity(tokenizer, pieces)
        except Exception:  # noqa: BLE001 - a template that raises on marker conversations is just not expressible
            pieces = None
        if pieces is not None and parity:
            strip = tokenizer.bos_token if adds_bos and tokenizer.bos_token else ""
            lines.append(f'TEMPLATE """{go_template(pieces, strip)}"""')
    for token in stop_tokens:
        lines.append(f'PARAMETER stop "{token}"')
    return "\n".join(lines) + "\n", parity
