"""Running the API under uvicorn: in the foreground (``tunelab serve``) or in a background thread (tests, bench).

uvicorn handles Ctrl-C itself: it stops accepting connections, lets open requests finish, then runs the
application's shutdown, where the decoding thread finishes what it admitted.
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


def run_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` until Ctrl-C (or SIGTERM); a port in use is a user error."""
    import uvicorn

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
            probe.bind((host, port))
    except OSError as exc:
        raise TunelabError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or stop what uses it") from None
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=60)


class BackgroundServer:
    """``with BackgroundServer(app) as url:`` serves ``app`` on 127.0.0.1 in a thread until the block ends.

    Args:
        app: The ASGI application.
        host: Address to bind.
        port: Port to bind; default a free one.
        startup_timeout: Seconds to wait for the server to listen.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, startup_timeout: float = 30):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        # uvicorn installs no signal handlers outside the main thread, so the caller keeps Ctrl-C.
        self.thread = threading.Thread(target=self.server.run, name="tunelab-serve-http", daemon=True)
        self.startup_timeout = startup_timeout

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
        self.thread.join(60)
