"""Running the API under uvicorn: in the foreground (``tunelab serve``) or in a background thread (tests, bench).

uvicorn handles Ctrl-C itself: it stops accepting connections, lets open requests run for at most
``drain_seconds`` (``--drain-seconds``), cancels the ones still running, then runs the application's
shutdown, where the decoding thread gets a few more seconds before what it holds is cancelled. So a server
in the middle of a huge job still exits within about ``drain_seconds`` of Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import socket
import threading
import time

from tunelab.errors import TunelabError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", drain_seconds: float = 30) -> None:
    """Serve ``app`` until Ctrl-C (or SIGTERM), then let open requests run ``drain_seconds`` at most; a port in
    use is a user error."""
    import uvicorn

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
            probe.bind((host, port))
    except OSError as exc:
        raise TunelabError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or stop what uses it") from None
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_seconds)


class BackgroundServer:
    """``with BackgroundServer(app) as url:`` serves ``app`` on 127.0.0.1 in a thread until the block ends.

    Args:
        app: The ASGI application.
        host: Address to bind.
        port: Port to bind; default a free one.
        startup_timeout: Seconds to wait for the server to listen.
        drain_seconds: On leaving the block, how long open requests may still run before they are cancelled.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, startup_timeout: float = 30,
                 drain_seconds: float = 30):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=drain_seconds)
        self.server = uvicorn.Server(config)
        # uvicorn installs no signal handlers outside the main thread, so the caller keeps Ctrl-C.
        self.thread = threading.Thread(target=self.server.run, name="tunelab-serve-http", daemon=True)
        self.startup_timeout, self.drain_seconds = startup_timeout, drain_seconds

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(self.drain_seconds + 30)
