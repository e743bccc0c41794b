"""What one client may cost the daemon: connection caps, read timeouts, quiet logs, auth throttling.

- **Connections**: at most `max_connections` open, and `max_connections_per_ip` per source
  address; one more is answered `503` in the documented error shape and closed at once, so
  stalled clients can never use up the daemon's file descriptors.
- **Timeouts**: a request's headers must arrive within `header_timeout` of its first byte (a
  new connection's clock starts when it opens); its body may go at most `body_timeout` without
  a byte; an idle keep-alive connection is closed after `keepalive_timeout`. A timed-out
  connection is aborted (there is no request to answer yet).
- **Logs**: malformed requests (a NUL in a header, a bad chunk size), clients that leave
  mid-body and timeouts each log one line with no traceback, at most `LOG_BURST` lines per
  `LOG_PERIOD` seconds per kind; the next line says how many were left out.
- **Authentication**: a source address that presents `auth_failures_allowed` wrong tokens
  within `auth_window` seconds gets 429 with Retry-After until the window has passed (audited
  once per episode as `auth.throttled`).

`serve.py` builds its runner with `server_options()` and listens through `GuardedSite`; the
errors middleware tells the guard when a request's handler starts and ends.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import sys
import time
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from daemon.config import Settings

log = logging.getLogger(__name__)

LOG_BURST = 5
LOG_PERIOD = 10.0


class LogLimiter:
    """One-line log records, at most LOG_BURST per LOG_PERIOD seconds per kind."""

    def __init__(self, logger: logging.Logger, burst: int = LOG_BURST, period: float = LOG_PERIOD) -> None:
        self.logger, self.burst, self.period = logger, burst, period
        self._windows: dict[str, tuple[float, int, int]] = {}  # kind -> (window start, logged, dropped)

    def log(self, level: int, kind: str, msg: str, *args: Any) -> None:
        """Log `msg % args` as one line unless this kind has had its burst in the current period."""
        now = time.monotonic()
        start, logged, dropped = self._windows.get(kind, (now, 0, 0))
        if now - start >= self.period:
            if dropped:
                self.logger.log(level, "%s: %d more like this in the last %.0f s were not logged", kind, dropped,
                                self.period)
            start, logged, dropped = now, 0, 0
        if logged < self.burst:
            text = (msg % args) if args else msg
            self.logger.log(level, "%s", " ".join(text.split())[:300])
            logged += 1
        else:
            dropped += 1
        self._windows[kind] = (start, logged, dropped)
        if len(self._windows) > 256:
            self._windows = {k: v for k, v in self._windows.items() if now - v[0] < self.period}


class OneLineLogger(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger, made to write one rate-limited line per event and never a traceback."""

    def __init__(self, limiter: LogLimiter) -> None:
        super().__init__(limiter.logger, {})
        self.limiter = limiter

    def log(self, level: int, msg: object, *args: object, exc_info: Any = None, **kwargs: Any) -> None:
        """Log as one line: the exception's class and first line in place of its traceback."""
        exc = exc_info if isinstance(exc_info, BaseException) else (sys.exc_info()[1] if exc_info else None)
        text = str(msg) % args if args else str(msg)
        if exc is not None:
            detail = " ".join(str(exc).split())[:200]  # the limiter writes one line in any case
            text = f"{text}: {type(exc).__name__}{': ' + detail if detail else ''}"
        # A malformed request is the client's fault: a warning, not an error of the daemon.
        self.limiter.log(min(level, logging.WARNING), f"http:{msg}", "%s", text)


class AuthThrottle:
    """Counts failed authentications per source address over a sliding window."""

    def __init__(self, allowed: int, window: float) -> None:
        self.allowed, self.window = allowed, window
        self._fails: dict[str, collections.deque[float]] = {}

    def retry_after(self, ip: str) -> float | None:
        """Seconds until `ip` may try again, or None when it is not throttled."""
        q = self._fails.get(ip)
        if q is None:
            return None
        now = time.monotonic()
        while q and now - q[0] >= self.window:
            q.popleft()
        if not q:
            del self._fails[ip]
            return None
        return self.window - (now - q[0]) if len(q) >= self.allowed else None

    def failed(self, ip: str) -> bool:
        """Record a failure; True when this one starts a throttle episode (audit it then)."""
        now = time.monotonic()
        if len(self._fails) > 4096:
            self._fails = {k: q for k, q in self._fails.items() if q and now - q[-1] < self.window}
        q = self._fails.setdefault(ip, collections.deque(maxlen=self.allowed))
        while q and now - q[0] >= self.window:
            q.popleft()
        was_throttled = len(q) >= self.allowed
        q.append(now)
        return not was_throttled and len(q) >= self.allowed


class TokenTouch:
    """When each token's `last_used` was last written: at most once a minute per token."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._written: dict[str, float] = {}

    def due(self, token_id: str) -> bool:
        """True (and remembered) when `token_id`'s last_used should be written now."""
        now = time.monotonic()
        if now - self._written.get(token_id, -1e18) < self.every:
            return False
        self._written[token_id] = now
        return True


class JsonErrorsHandler(RequestHandler):
    """aiohttp's connection handler, answering requests it cannot parse in the documented error shape."""

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """Log (one line, through OneLineLogger) as aiohttp does, answer JSON instead of text/plain."""
        super().handle_error(request, status, exc, message)
        code = "malformed_request" if status == 400 else "internal_error"
        text = "the request could not be parsed as HTTP" if status == 400 else "internal error"
        kind = "invalid_request_error" if status < 500 else "server_error"
        resp = web.json_response({"error": {"message": text, "type": kind, "code": code, "param": None}},
                                 status=status)
        resp.force_close()
        return resp


class _Conn(asyncio.Protocol):
    """One client connection: admits or refuses it, runs its timers, forwards to aiohttp's handler."""

    def __init__(self, guard: ConnectionGuard, inner: RequestHandler) -> None:
        self.guard, self.inner = guard, inner
        self.transport: asyncio.Transport | None = None
        self.ip = "?"
        self.admitted = False
        self.phase = "headers"  # headers -> body -> handling -> idle -> headers ...
        self.request: web.BaseRequest | None = None
        self._timer: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float, phase: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.phase = phase
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self.phase == "body" and self.request is not None and self.request.content.is_eof():
            self.phase = "handling"
            return
        if self.transport is not None and not self.transport.is_closing():
            if self.phase != "idle":
                self.guard.limiter.log(logging.INFO, f"timeout:{self.phase}",
                                       "closed a connection from %s: no complete request %s within the timeout",
                                       self.ip, "headers" if self.phase == "headers" else "body")
            self.transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the connection under the caps, or answer 503 and close it."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if peer else "?"
        if not self.guard.admit(self.ip):
            transport.write(self.guard.refusal)
            transport.close()
            return
        self.admitted = True
        self.guard.conns[self.inner] = self
        self.inner.connection_made(transport)
        self._arm(self.guard.settings.header_timeout, "headers")

    def data_received(self, data: bytes) -> None:
        """Restart the right timer, then let aiohttp parse the bytes."""
        if not self.admitted:
            return
        if self.phase == "idle":
            self._arm(self.guard.settings.header_timeout, "headers")
        elif self.phase == "body":
            self._arm(self.guard.settings.body_timeout, "body")
        self.inner.data_received(data)

    def eof_received(self) -> None:
        """Forwarded to aiohttp."""
        if self.admitted:
            self.inner.eof_received()

    def pause_writing(self) -> None:
        """Forwarded to aiohttp."""
        if self.admitted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        """Forwarded to aiohttp."""
        if self.admitted:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        """Release the connection's place under the caps."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.admitted:
            return
        self.admitted = False
        self.guard.release(self.ip)
        self.guard.conns.pop(self.inner, None)
        self.inner.connection_lost(exc)

    def started(self, request: web.BaseRequest) -> None:
        """The request's headers are in and its handler runs: from now on only the body is timed."""
        self.request = request
        if request.content.is_eof():
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.phase = "handling"
        else:
            self._arm(self.guard.settings.body_timeout, "body")

    def finished(self) -> None:
        """The handler is done: the connection idles until the next request or keepalive_timeout."""
        self.request = None
        self._arm(self.guard.settings.keepalive_timeout, "idle")


class ConnectionGuard:
    """Caps on connections (total and per source address) and the connection registry."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.total = 0
        self.per_ip: dict[str, int] = {}
        self.refused = 0  # connections refused over a cap, since start
        self.admitted = 0  # connections admitted, since start
        self.conns: dict[object, _Conn] = {}
        self.limiter = LogLimiter(log)
        body = json.dumps({"error": {"message": "too many connections; retry shortly", "type": "server_error",
                                     "code": "too_many_connections", "param": None}}).encode()
        self.refusal = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        b"Retry-After: 5\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode() +
                        b"\r\n\r\n" + body)

    def admit(self, ip: str) -> bool:
        """Take a place for a new connection from `ip`, or say no (and log it, rate-limited)."""
        n = self.per_ip.get(ip, 0)
        if self.total >= self.settings.max_connections or n >= self.settings.max_connections_per_ip:
            self.refused += 1
            self.limiter.log(logging.WARNING, "conn-cap", "refused a connection from %s: %d open from it, %d in "
                             "all (limits %d and %d)", ip, n, self.total, self.settings.max_connections_per_ip,
                             self.settings.max_connections)
            return False
        self.total += 1
        self.admitted += 1
        self.per_ip[ip] = n + 1
        return True

    def release(self, ip: str) -> None:
        """Give back a connection's place."""
        self.total -= 1
        n = self.per_ip.get(ip, 1) - 1
        if n:
            self.per_ip[ip] = n
        else:
            self.per_ip.pop(ip, None)

    def get(self, request: web.BaseRequest) -> _Conn | None:
        """The guarded connection carrying `request` (None under the test client, which has no guard)."""
        return self.conns.get(request.protocol)


class Edge:
    """Per-app edge state: the connection guard, the auth throttle, token touches, quiet logs."""

    def __init__(self, settings: Settings) -> None:
        self.guard = ConnectionGuard(settings)
        self.auth = AuthThrottle(settings.auth_failures_allowed, settings.auth_window)
        self.touch = TokenTouch()
        self.limiter = self.guard.limiter


EDGE = web.AppKey("edge", Edge)


def server_options(app: web.Application) -> dict[str, Any]:
    """Keyword arguments for web.AppRunner: keep-alive timeout and the one-line server logger."""
    edge = app[EDGE]
    return {"keepalive_timeout": edge.guard.settings.keepalive_timeout,
            "logger": OneLineLogger(LogLimiter(logging.getLogger("aiohttp.server")))}


class GuardedSite(web.TCPSite):
    """A TCP site whose connections pass through the app's ConnectionGuard."""

    async def start(self) -> None:
        """Listen; each new connection is wrapped in a guarded protocol."""
        server = self._runner.server
        assert server is not None and isinstance(self._runner, web.AppRunner)
        guard = self._runner.app[EDGE].guard
        self._runner._reg_site(self)  # what BaseSite.start does
        loop = asyncio.get_running_loop()
        # What web.Server.__call__ does, with the handler that answers parse errors in JSON.
        kwargs = server._kwargs

        def factory() -> _Conn:
            return _Conn(guard, JsonErrorsHandler(server, loop=loop, **kwargs))

        self._server = await loop.create_server(factory, self._host, self._port, ssl=self._ssl_context,
                                                backlog=self._backlog, reuse_address=self._reuse_address,
                                                reuse_port=self._reuse_port)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port
