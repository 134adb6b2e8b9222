"""Show what the model will be trained on: token statistics and one example with its loss mask.

Trained text is shown in bold green on a dark background and untrained text dimmed. Without colour
(``console.no_color``, or output that is not a terminal, e.g. a pipe or a log file) styles are lost, so
trained runs are wrapped in ``[[`` and ``]]`` instead; the legend says which scheme is in use.
"""

from __future__ import annotations

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tunelab.data.tokenize import TokenizeStats

TRAINED_STYLE = "bold bright_green on grey15"
UNTRAINED_STYLE = "dim"
OPEN_MARK, CLOSE_MARK = "[[", "]]"
_MAX_DROPPED_SHOWN = 5


def inspect_report(stats: TokenizeStats, rendered: list[tuple[str, bool]], console: Console, title: str) -> None:
    """Print token statistics and one rendered example with its trained tokens highlighted.

    Args:
        stats: From :func:`tunelab.data.tokenize_examples`.
        rendered: From :func:`tunelab.data.render_example`; ``(text, trained)`` runs. May be empty.
        console: Where to print.
        title: Heading, e.g. the data files' names.
    """
    console.print(_summary_table(stats, title))
    if stats.tokens_by_role:
        console.print(_role_table(stats))
    print_rendered(rendered, console)


def print_rendered(rendered: list[tuple[str, bool]], console: Console, title: str = "example (as the model sees it)") -> None:
    """One rendered sequence in a panel, its trained tokens highlighted (or bracketed without colour)."""
    if rendered:
        plain = console.no_color or console.color_system is None
        body = Group(_legend(plain), Text(""), _highlight(rendered, plain))
        console.print(Panel(body, title=title, title_align="left"))


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _summary_table(stats: TokenizeStats, title: str) -> Table:
    """Totals: how much data there is and how much of it is trained."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("statistic", style="bold")
    table.add_column("value", justify="right")
    table.add_row("records", f"{stats.examples:,}")
    table.add_row("tokens total", f"{stats.tokens:,}")
    table.add_row("tokens per record (mean / max)", f"{stats.mean_len:,.1f} / {stats.max_len:,}")
    table.add_row("trained tokens", f"{stats.trained_tokens:,} ({_share(stats.trained_tokens, stats.tokens)})")
    table.add_row("truncated", f"{stats.truncated:,}")
    dropped = f"{len(stats.dropped):,}"
    if stats.dropped:
        shown = ", ".join(stats.dropped[:_MAX_DROPPED_SHOWN])
        more = len(stats.dropped) - _MAX_DROPPED_SHOWN
        dropped += f" ({shown}{f', … {more} more' if more > 0 else ''})"
    table.add_row("dropped", dropped)
    if stats.tool_rendering:
        how = ("the model's chat template renders them" if stats.tool_rendering == "native"
               else "fallback: tools in the system turn, calls in <tool_call> tags")
        table.add_row("tool calls", f"{stats.tool_calls:,} ({how}; tool results are not trained)")
    return table


def _role_table(stats: TokenizeStats) -> Table:
    """Per role: where the tokens are and which of them are trained."""
    table = Table(title="tokens by role", title_justify="left")
    table.add_column("role")
    table.add_column("tokens", justify="right")
    table.add_column("share of tokens", justify="right")
    table.add_column("trained", justify="right")
    table.add_column("trained share", justify="right")
    order = ["template", "tools", "system", "user", "assistant", "tool"]
    roles = sorted(stats.tokens_by_role, key=lambda r: (order.index(r) if r in order else len(order), r))
    for role in roles:
        tokens = stats.tokens_by_role[role]
        trained = stats.trained_by_role.get(role, 0)
        table.add_row(role, f"{tokens:,}", _share(tokens, stats.tokens), f"{trained:,}", _share(trained, tokens))
    return table


def _legend(plain: bool) -> Text:
    """Explain the highlighting scheme actually used on this console."""
    legend = Text("legend: ")
    if plain:
        legend.append(f"{OPEN_MARK}trained{CLOSE_MARK}  not trained")
    else:
        legend.append("trained", style=TRAINED_STYLE)
        legend.append("  ")
        legend.append("not trained", style=UNTRAINED_STYLE)
    return legend


def _highlight(rendered: list[tuple[str, bool]], plain: bool) -> Text:
    """The example text; built from Text parts so brackets in the data are never read as markup."""
    text = Text()
    for piece, trained in rendered:
        if plain:
            text.append(f"{OPEN_MARK}{piece}{CLOSE_MARK}" if trained else piece)
        else:
            text.append(piece, style=TRAINED_STYLE if trained else UNTRAINED_STYLE)
    return text
