"""Admin API for people and machines: users, API tokens, the audit log and its verification."""

from __future__ import annotations

import datetime as dt
from typing import Any

from aiohttp import web

from daemon import accounts, audit, audit_verify
from daemon.api_auth import Handler, hash_new_password, principal_of, source_of
from daemon.auth import list_tokens, revoke_token
from daemon.bodies import read_json
from daemon.services import SERVICES
from daemon.token_limits import create_limited_token
from runtime.errors import BadRequest

_USERNAME = {"type": "string", "minLength": 1, "maxLength": accounts.MAX_USERNAME_CHARS}
_PASSWORD = {"type": "string", "minLength": 1, "maxLength": accounts.MAX_PASSWORD_CHARS}
USER_CREATE: dict[str, Any] = {
    "type": "object", "required": ["username", "password", "role"], "additionalProperties": False,
    "properties": {"username": _USERNAME, "password": _PASSWORD, "role": {"enum": list(accounts.ROLES)}},
}
USER_CHANGE: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "minProperties": 1,
    "properties": {"password": _PASSWORD, "role": {"enum": list(accounts.ROLES)}, "disabled": {"type": "boolean"}},
}
TOKEN_CREATE: dict[str, Any] = {
    "type": "object", "required": ["name", "role"], "additionalProperties": False,
    "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 64},
                   "role": {"enum": list(accounts.ROLES)},
                   "expires_in_days": {"type": "integer", "minimum": 1, "maximum": 3650},
                   "rate_per_minute": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
                   "daily_token_quota": {"type": "integer", "minimum": 1, "maximum": 10**12}},
}


def _actor(request: web.Request) -> accounts.Actor:
    return accounts.Actor(principal_of(request).name, source_of(request))


async def list_users(request: web.Request) -> web.Response:
    """GET /admin/users: every account (never a hash)."""
    s = request.app[SERVICES]
    return web.json_response({"data": await s.db.run(accounts.list_users, s.db.db.conn)})


async def create_user(request: web.Request) -> web.Response:
    """POST /admin/users {username, password, role}."""
    s = request.app[SERVICES]
    body = await read_json(request, USER_CREATE)
    username = accounts.check_username(body["username"])
    pw_hash = await hash_new_password(s, body["password"])
    await s.db.run(accounts.create_user, s.db.db.conn, username, pw_hash, body["role"], _actor(request))
    return web.json_response({"username": username, "role": body["role"]}, status=201)


async def change_user(request: web.Request) -> web.Response:
    """PATCH /admin/users/{username} {password?, role?, disabled?}: each change audited; sessions end."""
    s = request.app[SERVICES]
    username = request.match_info["username"]
    body = await read_json(request, USER_CHANGE)
    conn, actor = s.db.db.conn, _actor(request)
    pw_hash = await hash_new_password(s, body["password"]) if "password" in body else None
    if not any(u["username"] == username for u in await s.db.run(accounts.list_users, conn)):
        raise accounts.UserNotFound(f"no user named {username!r}", param="username")
    if pw_hash:
        await s.db.run(accounts.set_password, conn, username, pw_hash, actor)
    if "role" in body:
        await s.db.run(accounts.set_role, conn, username, body["role"], actor)
    if "disabled" in body:
        await s.db.run(accounts.set_disabled, conn, username, body["disabled"], actor)
    users = await s.db.run(accounts.list_users, conn)
    return web.json_response(next(u for u in users if u["username"] == username))


async def delete_user(request: web.Request) -> web.Response:
    """DELETE /admin/users/{username}: the account and its sessions."""
    s = request.app[SERVICES]
    username = request.match_info["username"]
    await s.db.run(accounts.delete_user, s.db.db.conn, username, _actor(request))
    return web.json_response({"deleted": username})


async def get_tokens(request: web.Request) -> web.Response:
    """GET /admin/tokens: every token's name, role, dates and limits (never the secret)."""
    s = request.app[SERVICES]

    def rows() -> list[dict[str, Any]]:
        extra = {r[0]: r[1:] for r in s.db.db.conn.execute(
            "SELECT name, expires, rate_per_minute, daily_token_quota, last_used FROM tokens").fetchall()}
        return [{**t, **dict(zip(("expires", "rate_per_minute", "daily_token_quota", "last_used"),
                                 extra.get(t["name"], (None,) * 4), strict=True))} for t in list_tokens(s.db)]

    return web.json_response({"data": await s.db.run(rows)})


async def post_token(request: web.Request) -> web.Response:
    """POST /admin/tokens {name, role, expires_in_days?, rate_per_minute?, daily_token_quota?}: shown once."""
    s = request.app[SERVICES]
    body = await read_json(request, TOKEN_CREATE)
    token, expires = await s.db.run(create_limited_token, s.db, body["name"], body["role"],
                                    principal_of(request).name, body.get("expires_in_days"),
                                    body.get("rate_per_minute"), body.get("daily_token_quota"))
    return web.json_response({"name": body["name"], "role": body["role"], "token": token, "expires": expires,
                              "rate_per_minute": body.get("rate_per_minute"),
                              "daily_token_quota": body.get("daily_token_quota")}, status=201)


async def delete_token(request: web.Request) -> web.Response:
    """DELETE /admin/tokens/{name}: revoke; it stops working at once."""
    s = request.app[SERVICES]
    name = request.match_info["name"]
    await s.db.run(revoke_token, s.db, name, principal_of(request).name)
    return web.json_response({"revoked": name})


def _time(request: web.Request, key: str) -> str | None:
    v = request.query.get(key)
    if v is None:
        return None
    try:
        t = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{key} must be an ISO 8601 time, e.g. 2026-01-31T00:00:00Z", param=key) from None
    t = t if t.tzinfo else t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _int(request: web.Request, key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = request.query.get(key)
    if v is None:
        return default
    try:
        n = int(v)
    except ValueError:
        raise BadRequest(f"{key} must be an integer", param=key) from None
    if not lo <= n <= hi:
        raise BadRequest(f"{key} must be between {lo} and {hi}", param=key)
    return n


async def get_audit(request: web.Request) -> web.Response:
    """GET /admin/audit?since&until&action&principal&outcome&before&limit: rows newest first; page with
    before=<the last seq you got>."""
    s = request.app[SERVICES]
    if unknown := sorted(set(request.query) - {"since", "until", "action", "principal", "outcome", "before",
                                               "after", "limit"}):
        raise BadRequest(f"unknown query parameter {unknown[0]!r}", param=unknown[0])
    filters = {"since": _time(request, "since"), "until": _time(request, "until"),
               "action": request.query.get("action"), "principal": request.query.get("principal"),
               "outcome": request.query.get("outcome"), "before": _int(request, "before", None, 1, 2**62),
               "after": _int(request, "after", None, 0, 2**62)}
    limit = _int(request, "limit", 100, 1, 1000) or 100
    rows = await s.db.run(audit.query, s.db.db.conn, filters, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return web.json_response({"data": rows, "next_before": rows[-1]["seq"] if more and rows else None})


async def get_audit_verify(request: web.Request) -> web.Response:
    """GET /admin/audit/verify: walk the chain now; a fresh signed checkpoint to keep."""
    s = request.app[SERVICES]
    key = s.security.key

    def run() -> dict[str, Any]:
        v = audit_verify.verify(s.db.db.conn, key.public_key())
        return {**v.to_json(), "checkpoint": audit_verify.current_checkpoint(s.db.db.conn, key).text()}

    return web.json_response(await s.db.run(run))


ROUTES: tuple[tuple[str, str, Handler, str, dict[str, Any] | None], ...] = (
    ("GET", "/admin/users", list_users, "Accounts (admin)", None),
    ("POST", "/admin/users", create_user, "Create an account (admin)", USER_CREATE),
    ("PATCH", "/admin/users/{username}", change_user, "Change password, role or disabled (admin)", USER_CHANGE),
    ("DELETE", "/admin/users/{username}", delete_user, "Delete an account (admin)", None),
    ("GET", "/admin/tokens", get_tokens, "API tokens and their limits (admin)", None),
    ("POST", "/admin/tokens", post_token, "Create an API token, shown once (admin)", TOKEN_CREATE),
    ("DELETE", "/admin/tokens/{name}", delete_token, "Revoke an API token (admin)", None),
    ("GET", "/admin/audit", get_audit, "Audit log rows with filters and paging (admin, auditor)", None),
    ("GET", "/admin/audit/verify", get_audit_verify, "Verify the audit chain; a signed checkpoint "
                                                     "(admin, auditor)", None),
)
