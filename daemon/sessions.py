"""Browser sessions: a random cookie, stored server-side only as its SHA-256, revocable.

The cookie `atoll_session` holds 256 random bits (43 url-safe characters). The server keeps
the hash, the user, the times and how the session ended. A session ends after
`idle` seconds without a request or `absolute` seconds after login, whichever comes first
(settings, overridden by the signed policy's [sessions] table). The CSRF token is
HMAC-free and needs no storage: SHA-256 of "csrf:" + the session secret, which a page can
only learn from the login answer or GET /auth/me, never from the HttpOnly cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from daemon import audit
from runtime.errors import Unauthorized

COOKIE = "atoll_session"
CSRF_HEADER = "X-CSRF-Token"
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")
#: last_seen is rewritten at most this often (seconds), so reads do not all become writes.
TOUCH_EVERY = 15.0


def migrate_sessions(db: Any) -> None:
    """Migration: the sessions table."""
    db.conn.execute("CREATE TABLE sessions (id_hash TEXT PRIMARY KEY, username TEXT NOT NULL, created REAL NOT NULL, "
                    "last_seen REAL NOT NULL, source TEXT, ended TEXT, end_reason TEXT)")
    db.conn.execute("CREATE INDEX sessions_user ON sessions (username)")


def _h(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def csrf_token(secret: str) -> str:
    """The CSRF token bound to a session."""
    return hashlib.sha256(f"csrf:{secret}".encode()).hexdigest()


def csrf_ok(secret: str, presented: str | None) -> bool:
    """Whether the presented CSRF token is the session's (constant-time)."""
    return presented is not None and hmac.compare_digest(csrf_token(secret), presented.strip())


@dataclass(frozen=True)
class Session:
    """An open session and its user."""

    username: str
    role: str
    created: float
    secret: str


def create(conn: sqlite3.Connection, username: str, source: str | None, now: float | None = None) -> str:
    """Open a session for `username`; return the cookie value (the only time it exists in clear)."""
    secret = secrets.token_urlsafe(32)
    t = time.time() if now is None else now
    conn.execute("INSERT INTO sessions (id_hash, username, created, last_seen, source) VALUES (?,?,?,?,?)",
                 [_h(secret), username, t, t, source])
    return secret


def lookup(conn: sqlite3.Connection, secret: str, idle: float, absolute: float, source: str | None,
           now: float | None = None) -> Session:
    """The open session for a cookie value, or Unauthorized (malformed, unknown, ended, expired)."""
    if not TOKEN_RE.fullmatch(secret):
        raise Unauthorized("malformed session cookie; log in again", code="invalid_session")
    row = conn.execute("SELECT s.username, s.created, s.last_seen, s.ended, s.end_reason, u.role, u.disabled "
                       "FROM sessions s LEFT JOIN users u ON u.username = s.username WHERE s.id_hash = ?",
                       [_h(secret)]).fetchone()
    if row is None:
        raise Unauthorized("unknown session; log in again", code="invalid_session")
    username, created, last_seen, ended, end_reason, role, disabled = row
    if ended:
        code = "session_expired" if end_reason in ("idle", "absolute") else "session_revoked"
        raise Unauthorized(f"this session has ended ({end_reason}); log in again", code=code)
    t = time.time() if now is None else now
    why = "absolute" if t - created > absolute else "idle" if t - last_seen > idle else None
    if why is None and (role is None or disabled):
        why = "user_disabled"
    if why:
        end(conn, secret, why, principal=username, source=source)
        code = "session_expired" if why in ("idle", "absolute") else "session_revoked"
        raise Unauthorized(f"this session has ended ({why}); log in again", code=code)
    if t - last_seen > TOUCH_EVERY:
        conn.execute("UPDATE sessions SET last_seen = ? WHERE id_hash = ?", [t, _h(secret)])
    return Session(username=username, role=role, created=created, secret=secret)


def end(conn: sqlite3.Connection, secret: str, reason: str, principal: str | None, source: str | None) -> bool:
    """End a session (logout, expiry, revocation) and audit it; False when it was not open."""
    with audit.transaction(conn):
        return _end(conn, secret, reason, principal, source)


def _end(conn: sqlite3.Connection, secret: str, reason: str, principal: str | None, source: str | None) -> bool:
    n = conn.execute("UPDATE sessions SET ended = ?, end_reason = ? WHERE id_hash = ? AND ended IS NULL",
                     [audit.utc_now(), reason, _h(secret)]).rowcount
    if n:
        action = ("session.logout" if reason == "logout" else
                  "session.expired" if reason in ("idle", "absolute") else "session.revoked")
        audit.append(conn, audit.Event(action, principal=principal, source=source,
                                       object=f"user:{principal}", reason=reason,
                                       outcome="expired" if action == "session.expired" else "ok"))
    return bool(n)
