"""The server's edge: who may connect, how long they may take, and which pages may drive it.

uvicorn alone holds a connection as long as its client keeps trickling bytes: its keep-alive
timer is cancelled by every byte, so headers sent one byte a second keep a socket (and a file
descriptor) forever, and nothing bounds a request body's pace or the number of connections
(``limit_concurrency`` answers 503 only once a request's headers are in, and never to a
WebSocket). :class:`GuardedH11Protocol` adds per-connection deadlines and a connection cap
below the app; :class:`EdgeChecks` refuses requests a browser page could forge (DNS
rebinding's foreign ``Host``, a foreign ``Origin``) before any route sees them; :class:`ApiKeyCheck`
asks for ``--api-key`` on every route but ``/healthz``.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import cast
from urllib.parse import urlsplit

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .schema import error_body


@dataclass(frozen=True)
class EdgeLimits:
    max_connections: int = 128  # open sockets, HTTP and WebSocket together; past it 503 and close
    header_timeout: float = 10.0  # from connect (or the previous response) to a request's last header
    body_timeout: float = 30.0  # from the last header to the body's last byte


# A route that reads the body answers 408 at body_timeout; the socket-level deadline is the
# backstop for routes that never read one, so it waits a little longer.
_BODY_BACKSTOP_SLACK = 1.0
_WARN_EVERY = 10.0  # seconds between "connection refused" log lines (a flood must not flood the log)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a body deadline and a connection cap.

    The deadlines are absolute: bytes arriving do not extend them (that is the slowloris hole)."""

    _last_warning = 0.0

    def __init__(self, *args, limits: EdgeLimits, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits
        self._timer = None
        self._phase: str | None = None  # "headers" or "body" while a deadline runs
        self._upgraded = False
        self._received = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self._limits.max_connections:
            self._refuse_connection()
            return
        self._arm("headers", self._limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        self._received = self._received or bool(data)
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._upgraded and self.conn.their_state is h11.IDLE:
            self._received = False
            self._arm("headers", self._limits.header_timeout)  # the next request's headers
        self._follow()

    def handle_websocket_upgrade(self, event) -> None:
        self._upgraded = True  # the socket belongs to the WebSocket protocol now: no deadline of ours
        self._disarm()
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _follow(self) -> None:
        """Move the deadline along with the client's side of the request."""
        if self._upgraded:
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body", self._limits.body_timeout + _BODY_BACKSTOP_SLACK)
        elif state is not h11.IDLE:
            self._disarm()  # the request is in whole (or the connection is ending)

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, None

    def _expired(self) -> None:
        phase, self._timer, self._phase = self._phase, None, None
        if self.transport.is_closing():
            return
        if phase == "headers" and self._received:  # a request was begun: say why it ends
            limit = self._limits.header_timeout
            self.transport.write(canned_response(408, f"the request headers did not arrive within {limit:g} s"))
        self.transport.close()  # a body past its deadline: the app sees a disconnect

    def _refuse_connection(self) -> None:
        now = time.monotonic()
        if now - GuardedH11Protocol._last_warning > _WARN_EVERY:
            GuardedH11Protocol._last_warning = now
            self.logger.warning("refusing connections: %d open, the limit is %d",
                                len(self.connections) - 1, self._limits.max_connections)
        message = f"this server holds at most {self._limits.max_connections} connections; try again later"
        self.transport.write(canned_response(503, message, kind="server_busy", retry_after=1))
        self.transport.close()


def canned_response(status: int, message: str, kind: str = "invalid_request_error",
                    retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for refusals made below the app."""
    body = json.dumps(error_body(message, kind=kind)).encode()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# --- Host and Origin -----------------------------------------------------------------------------


class OriginPolicy:
    """Which ``Host`` and ``Origin`` headers the server answers.

    Host: an IP literal, ``localhost``, the name the server is bound to, or an ``--allow-host``
    name. A DNS-rebinding page reaches a loopback server under the attacker's own name, which
    the browser puts in ``Host``; an IP literal or ``localhost`` can never be the attacker's.
    Origin: absent (not a browser: curl, SDKs), the request's own origin, or an ``--allow-origin``
    one. ``*`` in either list turns that check off."""

    def __init__(self, bound_host: str | None = None, hosts: Iterable[str] = (), origins: Iterable[str] = ()):
        self.hosts = {_hostname(h) for h in hosts} | {"localhost"}
        if bound_host and not _is_ip(bound_host):
            self.hosts.add(_hostname(bound_host))
        self.origins = {o.strip().rstrip("/").lower() for o in origins}

    def refusal(self, headers) -> tuple[int, str] | None:
        """(status, message) for a request to refuse, None to serve it."""
        host = headers.get("host", "")
        if host and "*" not in self.hosts and not self._host_allowed(host):
            return 400, (f"Host {host[:100]!r} is not a name this server answers to (a DNS rebinding "
                         f"guard); start it with --allow-host NAME to allow one")
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, host):
            return 403, (f"Origin {origin[:100]!r} may not use this server (cross-origin pages are refused); "
                         f"start it with --allow-origin ORIGIN to allow one")
        return None

    def allowing(self, origins: Iterable[str]) -> OriginPolicy:
        """This policy with more origins allowed (the CORS ones: a page they serve may call the API)."""
        wider = OriginPolicy()
        wider.hosts, wider.origins = set(self.hosts), self.origins | {o.strip().rstrip("/").lower() for o in origins}
        return wider

    def _host_allowed(self, host: str) -> bool:
        name = _hostname(_strip_port(host))
        return _is_ip(name) or name in self.hosts

    def _origin_allowed(self, origin: str, host: str) -> bool:
        normal = origin.strip().rstrip("/").lower()
        if "*" in self.origins or normal in self.origins:
            return True
        try:
            parts = urlsplit(normal)
        except ValueError:
            return False
        return parts.scheme in ("http", "https") and bool(host) and parts.netloc == host.strip().lower()


def _strip_port(host: str) -> str:
    host = host.strip()
    if host.startswith("["):  # [v6]:port
        return host[1:host.find("]")] if "]" in host else host
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() and ":" not in name else host


def _hostname(name: str) -> str:
    return name.strip().lower().rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


class EdgeChecks:
    """ASGI middleware: the :class:`OriginPolicy` applied to every HTTP request and WebSocket
    handshake, before routing. A refused WebSocket gets an HTTP status and an error body, never
    an open socket."""

    def __init__(self, app, policy: OriginPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        refusal = self.policy.refusal(Headers(scope=scope))
        if refusal is None:
            return await self.app(scope, receive, send)
        status, message = refusal
        await refuse(scope, receive, send, status, error_body(message))


async def refuse(scope, receive, send, status: int, body: dict, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """Answer an HTTP request or a WebSocket handshake with ``status`` and a JSON body, then close."""
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
               (b"connection", b"close"), *extra]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})
        return
    await receive()  # websocket.connect
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": data})
    else:
        await send({"type": "websocket.close", "code": 1008})  # the server answers 403


# --- the API key ---------------------------------------------------------------------------------

OPEN_PATHS = frozenset({"/healthz"})  # a load balancer's probe carries no key


def check_api_key(key: str) -> str:
    """The key as given, or ValueError: it must fit in an ``Authorization`` header as one token."""
    if not key or len(key) > 1024 or not all(33 <= ord(c) <= 126 for c in key):
        raise ValueError("the API key must be 1-1024 printable ASCII characters without spaces")
    return key


class ApiKeyCheck:
    """ASGI middleware: every request and WebSocket handshake but ``/healthz`` must carry
    ``Authorization: Bearer KEY`` (what OpenAI's clients send); otherwise 401 in OpenAI's error shape.

    A CORS preflight carries no credentials by design; the CORS middleware, outside this one,
    answers it before it gets here."""

    def __init__(self, app, key: str) -> None:
        self.app = app
        self._expected = f"bearer {check_api_key(key)}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("path") in OPEN_PATHS or self._allowed(scope):
            return await self.app(scope, receive, send)
        body = error_body("a valid API key is required: send Authorization: Bearer KEY (the server's --api-key "
                          "or DIA2_API_KEY)", code="invalid_api_key")
        await refuse(scope, receive, send, 401, body, ((b"www-authenticate", b"Bearer"),))

    def _allowed(self, scope) -> bool:
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
        scheme, _, token = given.partition(b" ")
        # Constant time over the token: the comparison must not say how much of a guess was right.
        return hmac.compare_digest(scheme.lower() + b" " + token.strip(), self._expected)


# --- the listening socket ------------------------------------------------------------------------


class ListenError(OSError):
    """The address cannot be listened on; the message is one line."""


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A socket bound and listening on ``host:port``, made before anything slow loads so a busy
    port fails at once; uvicorn serves on it (no window for another process to take the port)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no obstacle
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(f"port {port} on {host} is in use") from None
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app, limits: EdgeLimits, **options):
    """uvicorn's Config with the guarded protocol: the one way the CLI and the tests build a server."""
    import asyncio
    import functools

    import uvicorn

    # uvicorn annotates http as a protocol class but only calls it (once per connection): a factory
    # that binds the limits is what it runs.
    protocol = cast("type[asyncio.Protocol]", functools.partial(GuardedH11Protocol, limits=limits))
    return uvicorn.Config(app, http=protocol, **options)
