"""``tunelab ui``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tunelab.clikit import console, friendly


def register(app: typer.Typer) -> None:
    app.command("ui")(friendly(ui_command))


def ui_command(
    runs: Annotated[Optional[list[Path]], typer.Option("--runs", help="folder to find run directories in (repeat for more)")] = None,
    host: Annotated[str, typer.Option("--host", help="address to bind (127.0.0.1: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 7860,
    allowed_host: Annotated[Optional[list[str]], typer.Option(
        "--allowed-host", help="a further host name the dashboard is reached by (repeat for more; IP addresses, "
                               "localhost and --host always are): any other Host header is refused")] = None,
    allow_code: Annotated[bool, typer.Option(
        "--allow-code", help="let configs launched from the page import code they name (module:function metrics "
                             "and rewards, model.trust_remote_code); off: such configs are refused")] = False,
) -> None:
    """A web dashboard of your runs: status, scores untuned -> tuned, probe retention, live curves, every prediction.

    It reads run directories (any folder holding manifest.json, a few levels down) under --runs (default: runs/, created if missing) and never writes to them; runs started from its launch page are written there, and only there.
    """
    from tunelab.errors import TunelabError
    from tunelab.ui.app import create_app

    folders = runs or [Path("runs")]
    if not runs:
        folders[0].mkdir(exist_ok=True)  # a first look before any run: the demo launched from the page goes here
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise TunelabError(f"--runs {', '.join(missing)}: not a folder; point it at where your runs are (output_dir's parent)")
    import uvicorn

    console.print(f"tunelab ui on http://{host}:{port} over {', '.join(map(str, folders))} (Ctrl-C stops it)")
    app = create_app([str(f) for f in folders], host=host, allowed_hosts=allowed_host or (), allow_code=allow_code)
    uvicorn.run(app, host=host, port=port, log_level="warning")
