"""Authentication at the edge (bearer token or session cookie, CSRF, roles) and the /auth routes.

A request carries either `Authorization: Bearer <token>` (machines) or the session cookie
(people in a browser). A cookie-authenticated request that changes state (any method but
GET/HEAD/OPTIONS) must also carry the session's CSRF token in `X-CSRF-Token` and come from
this origin: an `Origin` header equal to this server's own scheme://host, or, without
Origin, `Sec-Fetch-Site: same-origin`. Bearer requests are not cookie-authenticated and
need neither. Refusals: 401 (no/bad credentials), 403 `csrf_failed` / `cross_origin` /
`insufficient_role`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from daemon import access, accounts, login, sessions, setup_code
from daemon.auth import Principal
from daemon.bodies import read_json
from daemon.middleware import PRINCIPAL, bearer_principal
from daemon.services import SERVICES, Services
from runtime.errors import BadRequest, Forbidden, Unauthorized

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LOGIN_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["username", "password"], "additionalProperties": False,
    "properties": {"username": {"type": "string", "minLength": 1, "maxLength": accounts.MAX_USERNAME_CHARS},
                   "password": {"type": "string", "minLength": 1, "maxLength": accounts.MAX_PASSWORD_CHARS}},
}
SETUP_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["code", "username", "password"], "additionalProperties": False,
    "properties": {"code": {"type": "string", "minLength": 1, "maxLength": 32},
                   **LOGIN_REQUEST["properties"]},
}


def source_of(request: web.Request) -> str:
    """The client's address (the box is not behind a proxy)."""
    return request.remote or "unknown"


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin.lower().rstrip("/") == f"{request.scheme}://{request.host}".lower()
    return request.headers.get("Sec-Fetch-Site", "").lower() == "same-origin"


def check_cross_site(request: web.Request) -> None:
    """403 for a browser request from another site (Origin or Sec-Fetch-Site says so)."""
    if not _same_origin(request):
        raise Forbidden("cross-origin request refused: it must come from this server's own pages",
                        code="cross_origin")


def session_timeouts(s: Services) -> tuple[float, float]:
    """(idle, absolute) session lifetimes in seconds: the signed policy's when it sets them, else the settings'."""
    lim = s.limits
    idle = lim.session_idle_minutes * 60 if lim.session_idle_minutes else s.security.idle_seconds
    absolute = lim.session_absolute_hours * 3600 if lim.session_absolute_hours else s.security.absolute_seconds
    return idle, absolute


async def authenticate(request: web.Request) -> Principal:
    """The principal of a request (bearer token or session cookie), CSRF and origin checked; or raise."""
    s: Services = request.app[SERVICES]
    sec, db, src = s.security, s.db, source_of(request)
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("send 'Authorization: Bearer <token>' or log in", code="missing_token")
        principal = await bearer_principal(request, token)
        await db.run(sec.limiter.admit, db, principal.token_id, request.path, src)
        return principal
    secret = request.cookies.get(sessions.COOKIE)
    if secret is None:
        raise Unauthorized("credentials required: an API token (Authorization: Bearer) or a session "
                           "(POST /auth/login)", code="missing_token")
    idle, absolute = session_timeouts(s)
    sess = await db.run(sessions.lookup, db.db.conn, secret, idle, absolute, src)
    if request.method not in access.SAFE_METHODS:
        check_cross_site(request)
        if not sessions.csrf_ok(secret, request.headers.get(sessions.CSRF_HEADER)):
            raise Forbidden(f"missing or wrong CSRF token: send the session's token in {sessions.CSRF_HEADER}",
                            code="csrf_failed")
    return Principal(sess.username, sess.role, kind="session")


def authorize(principal: Principal, method: str, path: str) -> None:
    """403 unless the principal's role may call this route."""
    roles = access.allowed_roles(method, path)
    if principal.role not in roles:
        raise Forbidden(f"{principal.name!r} has role {principal.role!r}; this route needs "
                        f"{' or '.join(sorted(roles))}")


async def admit(request: web.Request) -> Principal | None:
    """Authenticate and authorize a request; None for routes that need no principal."""
    if request.path in access.PUBLIC_PATHS:
        return None
    if (request.method, request.path) in access.CREDENTIAL_ROUTES:
        if request.headers.get("Origin") is not None or request.headers.get("Sec-Fetch-Site"):
            check_cross_site(request)  # login CSRF: another site must not log a browser in
        return None
    principal = await authenticate(request)
    if request.match_info.http_exception is None:  # an unknown route or method is a 404/405 for anyone signed in
        authorize(principal, request.method, request.match_info.route.resource.canonical
                  if request.match_info.route.resource else request.path)
    return principal


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Credentials on every route but the probes (and the routes whose body is the credential); roles."""
    principal = await admit(request)
    if principal is not None:
        request[PRINCIPAL] = principal
    return await handler(request)


def principal_of(request: web.Request) -> Principal:
    """The principal the middleware admitted."""
    return request[PRINCIPAL]


async def _body(request: web.Request, schema: dict[str, Any]) -> dict[str, Any]:
    if not request.can_read_body:
        raise Unauthorized("send the credentials as a JSON body", code="missing_credentials")
    return await read_json(request, schema)


def set_cookie(response: web.Response, secret: str, request: web.Request, max_age: float) -> None:
    """The session cookie: HttpOnly, SameSite=Strict, Path=/, Secure when served over TLS."""
    response.set_cookie(sessions.COOKIE, secret, httponly=True, samesite="Strict", path="/",
                        secure=request.secure, max_age=int(max_age))


async def post_login(request: web.Request) -> web.Response:
    """POST /auth/login {username, password}: a session cookie and its CSRF token."""
    s = request.app[SERVICES]
    body = await _body(request, LOGIN_REQUEST)
    username = accounts.check_username(body["username"])
    res = await login.login(s.db, s.security.throttle, username, body["password"], source_of(request),
                            s.security.lockout_seconds)
    idle, absolute = session_timeouts(s)
    resp = web.json_response({"username": res.username, "role": res.role, "csrf_token": res.csrf,
                              "idle_timeout_seconds": idle, "absolute_timeout_seconds": absolute})
    set_cookie(resp, res.secret, request, absolute)
    return resp


async def post_logout(request: web.Request) -> web.Response:
    """POST /auth/logout: end this session (a bearer token is not a session: nothing ends)."""
    s = request.app[SERVICES]
    p = principal_of(request)
    ended = False
    secret = request.cookies.get(sessions.COOKIE)
    if p.kind == "session" and secret:
        ended = await s.db.run(sessions.end, s.db.db.conn, secret, "logout", p.name, source_of(request))
    resp = web.json_response({"ended": ended})
    resp.del_cookie(sessions.COOKIE, path="/")
    return resp


async def get_me(request: web.Request) -> web.Response:
    """GET /auth/me: who is calling, with the CSRF token of a session."""
    p = principal_of(request)
    out: dict[str, Any] = {"username": p.name, "role": p.role, "kind": p.kind}
    secret = request.cookies.get(sessions.COOKIE)
    if p.kind == "session" and secret:
        out["csrf_token"] = sessions.csrf_token(secret)
    return web.json_response(out)


async def get_own_usage(request: web.Request) -> web.Response:
    """GET /auth/usage?limit=N: the caller's own latest usage records (metadata only)."""
    s = request.app[SERVICES]
    try:
        limit = max(1, min(1000, int(request.query.get("limit", "100"))))
    except ValueError:
        raise BadRequest("limit must be an integer", param="limit") from None
    rows = await s.db.run(lambda: [dict(r) for r in s.db.db.query(
        "SELECT ts, endpoint, model, prompt_tokens, completion_tokens, latency_ms, status, http_status "
        "FROM usage WHERE principal = ? ORDER BY id DESC LIMIT ?", [principal_of(request).name, limit])])
    return web.json_response({"data": rows})


async def hash_new_password(s: Services, password: Any, param: str = "password") -> str:
    """Check a new password against the site's rule and hash it off the event loop."""
    pw = accounts.check_password(password, s.security.password_min_length, param)
    async with s.security.throttle.hashing:
        return await asyncio.to_thread(accounts.hash_password, pw)


async def post_setup(request: web.Request) -> web.Response:
    """POST /auth/setup {code, username, password}: spend the one-time setup code on the first admin."""
    s = request.app[SERVICES]
    body = await _body(request, SETUP_REQUEST)
    username = accounts.check_username(body["username"])
    pw_hash = await hash_new_password(s, body["password"])
    await s.db.run(setup_code.use, s.settings.state_dir, s.db.db.conn, body["code"], username, pw_hash,
                   source_of(request))
    return web.json_response({"username": username, "role": "admin"}, status=201)


PASSWORD_CHANGE: dict[str, Any] = {
    "type": "object", "required": ["current_password", "new_password"], "additionalProperties": False,
    "properties": {"current_password": LOGIN_REQUEST["properties"]["password"],
                   "new_password": LOGIN_REQUEST["properties"]["password"]},
}


async def post_password(request: web.Request) -> web.Response:
    """POST /auth/password {current_password, new_password}: a person changes their own password.

    The current password is checked like a login (a miss counts towards the lockout); the
    change ends every session of the user, this one included, so the page logs in again."""
    s = request.app[SERVICES]
    p = principal_of(request)
    body = await read_json(request, PASSWORD_CHANGE)
    if p.kind != "session":
        raise BadRequest("an API token has no password; log in as the person", code="not_a_session")
    new_hash = await hash_new_password(s, body["new_password"], "new_password")
    await login.login(s.db, s.security.throttle, p.name, body["current_password"], source_of(request),
                      s.security.lockout_seconds)  # raises on a wrong password; opens a session we end below
    await s.db.run(accounts.set_password, s.db.db.conn, p.name, new_hash,
                   accounts.Actor(p.name, source_of(request)))
    resp = web.json_response({"changed": True})
    resp.del_cookie(sessions.COOKIE, path="/")
    return resp


ROUTES: tuple[tuple[str, str, Handler, str, dict[str, Any] | None], ...] = (
    ("POST", "/auth/login", post_login, "Log in: a session cookie and its CSRF token", LOGIN_REQUEST),
    ("POST", "/auth/logout", post_logout, "End this session", None),
    ("GET", "/auth/me", get_me, "Who is calling (and the session's CSRF token)", None),
    ("GET", "/auth/usage", get_own_usage, "The caller's own usage records", None),
    ("POST", "/auth/password", post_password, "Change one's own password (ends one's sessions)", PASSWORD_CHANGE),
    ("POST", "/auth/setup", post_setup, "Spend the one-time setup code: create the first admin", SETUP_REQUEST),
)
