"""``tunelab chat``: a terminal conversation with a run or a model, through the training chat template.

Answers stream as they are decoded (:func:`tunelab.generation.stream`), and the whole conversation is sent
each turn, so the model sees what it said before. Commands: ``/reset`` forgets the conversation (keeping
the system message), ``/system TEXT`` sets the system message (and starts over), ``/exit`` ends.
"""

from __future__ import annotations

from typing import Callable

from tunelab.generation import SamplingSettings, stream

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system message), /exit"


class ChatSession:
    """A conversation with one model: its messages and how to answer the next user turn.

    Args:
        model: A causal LM (plain or PEFT-wrapped).
        tokenizer: The tokenizer with the chat template used in training.
        settings: Decoding settings for every answer.
        system: An initial system message.
    """

    def __init__(self, model, tokenizer, settings: SamplingSettings, system: str | None = None):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.system = system
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def answer(self, text: str, write: Callable[[str], None]) -> str:
        """Answer the user's ``text``, writing the answer piece by piece; returns the whole answer."""
        self.messages.append({"role": "user", "content": text})
        pieces = []
        for delta in stream(self.model, self.tokenizer, self.messages, self.settings):
            pieces.append(delta)
            write(delta)
        answer = "".join(pieces)
        self.messages.append({"role": "assistant", "content": answer.strip()})
        return answer

    def handle(self, line: str, write: Callable[[str], None]) -> bool:
        """Act on one input line (a command or a user turn); False when the user asked to end."""
        line = line.strip()
        if not line:
            return True
        if line in ("/exit", "/quit"):
            return False
        if line == "/reset":
            self.reset()
            write("(conversation reset)\n")
        elif line == "/system" or line.startswith("/system "):
            self.system = line[len("/system"):].strip() or None
            self.reset()
            write(f"(system message {'set' if self.system else 'cleared'}; conversation reset)\n")
        elif line.startswith("/"):
            write(f"unknown command {line.split()[0]!r}; {HELP}\n")
        else:
            self.answer(line, write)
            write("\n")
        return True


def chat_loop(session: ChatSession, read: Callable[[str], str], write: Callable[[str], None]) -> None:
    """Read lines until ``/exit`` or end of input (Ctrl-D), answering each turn."""
    write(f"{HELP}\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("\n")
            return
        if not session.handle(line, write):
            return
