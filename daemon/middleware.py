"""The edge of the HTTP API: the one error middleware, the auth middleware, body parsing."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import jsonschema
from aiohttp import web

from daemon.auth import Principal, verify_token
from daemon.services import SERVICES
from runtime.errors import AtollError, BadRequest, Forbidden, NotFound, PayloadTooLarge, Unauthorized

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal", Principal)
#: Routes anyone on the LAN may call (probes for systemd, load balancers, monitoring).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})


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


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every error to OpenAI's error shape; unknown exceptions become a bare 500."""
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
    except (ConnectionResetError, OSError) as e:
        log.info("%s %s: client connection lost (%s)", request.method, request.path, e)
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(AtollError("internal error; the daemon log has the details"))


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Require a bearer token everywhere but the health probes; admin routes need the admin role."""
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'", code="missing_token")
    db = request.app[SERVICES].db
    principal = await db.run(verify_token, db, token.strip())
    if request.path.startswith("/admin/") and not principal.is_admin:
        raise Forbidden(f"token {principal.name!r} has role {principal.role!r}; this route needs 'admin'")
    request[PRINCIPAL] = principal
    return await handler(request)


async def read_json(request: web.Request, schema: dict[str, Any]) -> dict[str, Any]:
    """Read the body as UTF-8 JSON and validate it; a 400 names the problem and the field."""
    raw = await request.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                         code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    err = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(body))
    if err is not None:
        field = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p))
                        for i, p in enumerate(err.absolute_path))
        where = field or "body"
        raise BadRequest(f"{where}: {err.message}", param=field or None, code="invalid_value")
    return body
