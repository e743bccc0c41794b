"""The edge of the HTTP API: the one error middleware and the auth middleware (bodies: daemon/bodies.py)."""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from daemon import audit
from daemon.auth import Principal, verify_token
from daemon.db import now_iso
from daemon.edge import EDGE
from daemon.services import SERVICES
from runtime.errors import (
    AtollError,
    BadRequest,
    InsufficientStorage,
    NotFound,
    PayloadTooLarge,
    TooManyFailedLogins,
    Unauthorized,
)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal", Principal)


def error_body(err: AtollError) -> dict[str, Any]:
    """OpenAI's error shape for an atoll error."""
    return {"error": {"message": err.message, "type": err.type, "code": err.code, "param": err.param}}


def error_response(err: AtollError) -> web.Response:
    """A JSON error response with the error's status (and Retry-After when it has one)."""
    headers = {"Retry-After": str(int(err.retry_after))} if err.retry_after is not None else None
    if err.status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": 'Bearer realm="atoll"'}
    return web.json_response(error_body(err), status=err.status, headers=headers)


_HTTP_EXC: dict[int, type[AtollError]] = {404: NotFound, 413: PayloadTooLarge}


def client_gone(request: web.Request) -> bool:
    """Whether the client of `request` has closed its connection."""
    return request.transport is None or request.transport.is_closing()


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every error to OpenAI's error shape; unknown exceptions become a bare 500."""
    conn = request.app[EDGE].guard.get(request)
    if conn is not None:
        conn.started(request)
    try:
        return await _answer(request, handler)
    finally:
        if conn is not None:
            conn.finished()


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    limiter = request.app[EDGE].limiter
    try:
        return await handler(request)
    except AtollError as e:
        if e.status >= 500:
            log.warning("%s %s -> %d %s: %s", request.method, request.path, e.status, e.code, e.message)
        return error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        cls = _HTTP_EXC.get(e.status)
        if cls is None:
            err: AtollError = AtollError(e.reason)
            err.status, err.type, err.code = e.status, "invalid_request_error", e.reason.lower().replace(" ", "_")
        elif cls is PayloadTooLarge:
            limit = request.app[SERVICES].settings.max_body_bytes
            err = PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
        else:
            err = cls(f"no route {request.method} {request.path}")
        resp = error_response(err)
        if e.status == 405:
            resp.headers["Allow"] = e.headers.get("Allow", "")
        return resp
    except RequestPayloadError as e:
        # The body broke off: the client left mid-body, or sent a bad chunk size or encoding.
        limiter.log(logging.INFO, "payload", "%s %s from %s: request body incomplete or malformed (%s)",
                    request.method, request.path, request.remote, e)
        return error_response(BadRequest("the request body is incomplete or malformed", code="bad_body"))
    except OSError as e:
        if isinstance(e, ConnectionError) or client_gone(request):
            limiter.log(logging.INFO, "client-gone", "%s %s from %s: client connection lost (%s)",
                        request.method, request.path, request.remote, type(e).__name__)
            raise
        # The daemon's own I/O failed (disk full, mkstemp, a read-only store): the documented shape.
        log.error("%s %s: server-side I/O error: %s", request.method, request.path, e)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return error_response(InsufficientStorage("the box is out of disk space; nothing was changed. "
                                                      "Free space on the state directory and retry"))
        return error_response(AtollError("internal error (server-side I/O); the daemon log has the details"))
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(AtollError("internal error; the daemon log has the details"))


async def bearer_principal(request: web.Request, token: str) -> Principal:
    """The principal of a bearer token; failed tries are throttled per source address (429) and audited,
    and the token's last use is recorded (at most once a minute). Roles are checked by the caller."""
    services, edge = request.app[SERVICES], request.app[EDGE]
    ip = request.remote or "?"
    wait = edge.auth.retry_after(ip)
    if wait is not None:
        raise TooManyFailedLogins(f"too many failed authentications from {ip}; retry in {wait:.0f} s",
                                  retry_after=max(1.0, wait + 0.5))
    db = services.db
    try:
        principal = await db.run(verify_token, db, token)
    except Unauthorized:
        if edge.auth.failed(ip):
            edge.limiter.log(logging.WARNING, "auth-throttle", "throttling authentication from %s: %d failures "
                             "within %.0f s", ip, edge.auth.allowed, edge.auth.window)
            services.spawn(db.run(audit.append, db.db.conn, audit.Event(
                "auth.throttled", source=ip, outcome="refused", reason="failed_authentications",
                detail={"failures": edge.auth.allowed, "window_seconds": edge.auth.window})))
        raise
    if principal.token_id and edge.touch.due(principal.token_id):
        services.spawn(db.run(db.touch_token, principal.token_id, now_iso()))
    return principal
