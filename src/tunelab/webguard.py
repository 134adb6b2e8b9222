"""Guards every local HTTP service of tunelab (the API server, the dashboard) puts in front of its routes.

A service on 127.0.0.1 is still reachable from any web page the user opens: the page cannot read a
cross-origin answer, but it can send requests, and with DNS rebinding (a name of the attacker's that first
resolves to the attacker, then to 127.0.0.1) it can read them too. Two checks close that, as Django's
``ALLOWED_HOSTS`` and Jupyter's ``allow_remote_access`` do:

- **Host.** A rebound request carries the attacker's name in ``Host``. Only names the service was told it is
  reached by pass: IP literals (a page cannot rebind an address), ``localhost``, the bound host name, and the
  names given with ``--allowed-host``. Anything else is answered 400 before any route runs.
- **Origin.** A state-changing request (any method but GET, HEAD, OPTIONS) sent by a browser carries
  ``Origin``; it must name the service itself (the same host and port as ``Host``) or an allowed name.
  ``Origin: null`` (sandboxed frames, files) is refused. Clients that are not browsers send no ``Origin``.

Starlette's ``TrustedHostMiddleware`` covers the first check only and knows no IP-literal rule, so this
small pure-ASGI middleware is written here, shared by both services.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Iterable
from urllib.parse import urlsplit

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _split_host(value: str) -> tuple[str, str]:
    """``host[:port]`` (``[v6]:port`` included) as a lower-case name and the port text ('' when absent)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else ""
    name, sep, port = value.rpartition(":")
    return (name, port) if sep and port.isdigit() else (value, "")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostGuard:
    """Allowed host names and the two checks, as pure functions of header values.

    Args:
        bound: The address or name the service listens on (a wildcard address adds nothing).
        extra: Further names the service may be reached by (``--allowed-host``); ``*`` turns the Host check off.
    """

    def __init__(self, bound: str = "127.0.0.1", extra: Iterable[str] = ()):
        names = {"localhost", _split_host(bound)[0]}
        names |= {_split_host(name)[0] for name in extra if name.strip()}
        self.any_host = "*" in names
        self.names = frozenset(n for n in names if n and n != "*")

    def host_allowed(self, host_header: str | None) -> bool:
        """Whether a request with this ``Host`` header may be served."""
        if self.any_host:
            return True
        if not host_header:
            return False
        name, _ = _split_host(host_header)
        return _is_ip(name) or name in self.names

    def origin_allowed(self, origin: str | None, host_header: str | None) -> bool:
        """Whether a state-changing request from this ``Origin`` may be served (no Origin: not a browser)."""
        if origin is None:
            return True
        parts = urlsplit(origin.strip().lower())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # 'null', file:, extensions
        if host_header and parts.netloc == host_header.strip().lower():
            return True  # the service's own pages
        return _split_host(parts.netloc)[0] in self.names or self.any_host


class HostGuardMiddleware:
    """ASGI middleware applying :class:`HostGuard` to every HTTP request (``app.add_middleware(HostGuardMiddleware,
    guard=...)``). Refusals are JSON with OpenAI's error shape, which the dashboard's pages show as well."""

    def __init__(self, app, guard: HostGuard):
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host")
        if not self.guard.host_allowed(host):
            return await _refuse(send, 400, f"Host {host!r} is not allowed: reach this service by its address, "
                                            "or start it with --allowed-host NAME", "invalid_host")
        if scope.get("method", "GET").upper() not in SAFE_METHODS and not self.guard.origin_allowed(headers.get("origin"), host):
            return await _refuse(send, 403, f"Origin {headers.get('origin')!r} may not change this service's state: only "
                                            "its own pages and --allowed-host names may", "invalid_origin")
        return await self.app(scope, receive, send)


async def _refuse(send, status: int, message: str, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code},
                       "detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
