"""The aiohttp application factory, the route table and /openapi.json built from it.

`create_app(settings, services)` is used identically by `atoll serve` and by the tests.
Every route is declared once in ROUTES, with what /openapi.json says about it, so the
document cannot describe a route that does not exist or miss one that does.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from daemon import access, api_admin, api_auth, api_openai, api_updates, api_users
from daemon.access import PUBLIC_PATHS
from daemon.api_auth import auth_middleware
from daemon.config import Settings
from daemon.edge import EDGE, Edge
from daemon.middleware import errors_middleware
from daemon.schemas import BUNDLE_PATH_REQUEST, CHAT_REQUEST, COMPLETION_REQUEST, EMBEDDING_REQUEST, ERROR_RESPONSE
from daemon.services import SERVICES, VERSION, Services, package_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """One HTTP route and its documentation."""

    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    summary: str
    request_schema: dict[str, Any] | None = None
    streams: bool = False


async def openapi(request: web.Request) -> web.Response:
    """GET /openapi.json: this API, described from the route table."""
    return web.json_response(openapi_document(request.app[VERSION]))


ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/chat/completions", api_openai.chat_completions,
          "Chat completion (stream with SSE when stream=true)", CHAT_REQUEST, streams=True),
    Route("POST", "/v1/completions", api_openai.completions,
          "Text completion (stream with SSE when stream=true)", COMPLETION_REQUEST, streams=True),
    Route("POST", "/v1/embeddings", api_openai.embeddings,
          "Embeddings, for models that serve them (400 otherwise)", EMBEDDING_REQUEST),
    Route("GET", "/v1/models", api_openai.list_models, "The served models and their state"),
    Route("GET", "/healthz", api_admin.healthz, "Liveness: the process answers"),
    Route("GET", "/readyz", api_admin.readyz, "Readiness: a model is loaded (503 while none is)"),
    Route("GET", "/openapi.json", openapi, "This document"),
    Route("GET", "/admin/status", api_admin.admin_status, "What the daemon serves (admin)"),
    Route("GET", "/admin/usage", api_admin.admin_usage, "Latest usage records (admin)"),
    Route("GET", "/admin/hardware", api_admin.admin_hardware,
          "Sensors, governor state and history, variant decisions and swaps (admin)"),
    Route("GET", "/admin/bundles", api_updates.get_bundles,
          "Installed release, update progress (phase, bytes, files), last import result (admin)"),
    Route("POST", "/admin/bundles", api_updates.post_bundle,
          "Import a signed bundle: a tar body (application/x-tar) or {\"path\": DIR} on the box (admin)",
          BUNDLE_PATH_REQUEST),
    Route("POST", "/admin/rollback", api_updates.post_rollback, "Return to the previous release (admin)"),
    *(Route(*r) for r in api_auth.ROUTES + api_users.ROUTES),
)

_ERRORS = {
    "400": "Bad request: the message names the field",
    "401": "Missing, unknown, expired or revoked token or session",
    "403": "The role may not use this route, or a cookie request lacks its CSRF token or is cross-origin",
    "404": "Unknown model", "413": "Body over the size limit", "415": "Body not sent as application/json",
    "429": "Queue full, too many failed authentications, a token over its rate or quota, or a login "
           "throttled or locked; see Retry-After",
    "503": "Model loading, broken or its worker crashed; see Retry-After",
    "504": "The request passed its deadline", "507": "The box's disk is full",
}


def openapi_document(app_version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 description of every route in ROUTES."""
    paths: dict[str, Any] = {}
    err_ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for r in ROUTES:
        op: dict[str, Any] = {"summary": r.summary, "operationId": r.handler.__name__}
        ok: dict[str, Any] = {"description": "OK", "content": {"application/json": {}}}
        if r.streams:
            ok["content"]["text/event-stream"] = {}
        op["responses"] = {"200": ok}
        if (r.method, r.path) in access.CREDENTIAL_ROUTES:
            op["security"] = []
            op["x-credentials"] = "body"  # no token or session; the body carries them (401 without)
            op["responses"].update({code: {"description": d, **err_ref} for code, d in _ERRORS.items()
                                    if code in ("400", "401", "429")})
        elif r.path not in PUBLIC_PATHS:
            op["security"] = [{"bearer": []}, {"session": []}]
            op["x-roles"] = sorted(access.allowed_roles(r.method, r.path))
            op["responses"].update({code: {"description": d, **err_ref} for code, d in _ERRORS.items()
                                    if r.request_schema or code in ("401", "403")})
        else:
            op["security"] = []
            if r.path == "/readyz":
                op["responses"]["503"] = {"description": "No model loaded yet"}
        if r.request_schema:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": r.request_schema}}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "atoll", "version": app_version,
                 "description": "OpenAI-compatible LAN inference with an admin API. Errors use "
                                "{\"error\": {\"message\", \"type\", \"code\", \"param\"}}."},
        "paths": paths,
        "components": {"schemas": {"Error": ERROR_RESPONSE},
                       "securitySchemes": {
                           "bearer": {"type": "http", "scheme": "bearer"},
                           "session": {"type": "apiKey", "in": "cookie", "name": "atoll_session",
                                       "description": "from POST /auth/login; state changes also need the "
                                                      "X-CSRF-Token header and a same-origin request"}}},
    }


def create_app(settings: Settings, services: Services) -> web.Application:
    """Build the aiohttp application; starting it starts the services, cleanup stops them."""
    app = web.Application(middlewares=[errors_middleware, auth_middleware],
                          client_max_size=settings.max_body_bytes)
    app[SERVICES] = services
    app[VERSION] = package_version()
    app[EDGE] = Edge(settings)
    for r in ROUTES:
        app.router.add_route(r.method, r.path, r.handler)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        await services.start()
        yield
        await services.stop()

    app.cleanup_ctx.append(lifetime)
    app.cleanup_ctx.append(_usage_retention)
    return app


async def _usage_retention(app: web.Application) -> AsyncIterator[None]:
    """Delete usage records older than `usage_retention_days`, at start and then hourly."""
    services = app[SERVICES]
    days = services.settings.usage_retention_days

    async def purge() -> None:
        while True:
            cutoff = (dt.datetime.now(dt.UTC) - dt.timedelta(days=days)).isoformat(timespec="milliseconds")
            try:
                n = await services.db.run(services.db.purge_usage, cutoff)
                if n:
                    log.info("deleted %d usage records older than %d days", n, days)
            except Exception as e:  # a locked or full database: try again next hour
                log.warning("usage retention: purge failed: %s", e)
            await asyncio.sleep(3600)

    task = asyncio.create_task(purge()) if days else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
