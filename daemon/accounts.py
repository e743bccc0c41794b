"""People's accounts: username, role, memory-hard password hash; create, list, change, disable, delete.

Password hash: scrypt from Python's standard library (OpenSSL), N=2^15, r=8, p=2 (32 MiB per
hash). Chosen over argon2id (argon2-cffi) because it is memory-hard too, needs no extra
native wheel in the offline wheelhouse, and its cost can be set so a login takes 50-250 ms
on this class of box: about 150 ms on the idle 2-core build VM (`python -m bench.security`).
That is a little under OWASP's scrypt table (N=2^15 r=8 p=3); a site with faster CPUs can
raise SCRYPT_P or SCRYPT_N. Each hash is stored as `scrypt$N$r$p$salt$hash` (base64), so the
cost can be raised later and old hashes still verify. Hashing runs in a thread, at most
two at once (64 MiB), never on the event loop.

Rules (NIST SP 800-63B): a minimum length the site sets (`password_min_length`), no
composition rules, at most MAX_PASSWORD_CHARS characters (bounded work: a longer password
is refused before anything is hashed).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import sqlite3
from dataclasses import dataclass
from typing import Any

from daemon import audit
from daemon.db import now_iso
from runtime.errors import BadRequest, NotFound

ROLES = ("user", "admin", "auditor")
USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MAX_USERNAME_CHARS = 64
MAX_PASSWORD_CHARS = 256
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 2
_MAXMEM = 256 * 2**20


class UserExists(BadRequest):
    """A user with that name exists."""

    code = "user_exists"


class UserNotFound(NotFound):
    """No user with that name."""

    code = "user_not_found"


def migrate_users(db: Any) -> None:
    """Migration: the users table."""
    db.conn.execute("CREATE TABLE users (username TEXT PRIMARY KEY, role TEXT NOT NULL, pw_hash TEXT NOT NULL, "
                    "created TEXT NOT NULL, changed TEXT NOT NULL, disabled TEXT, failures INTEGER NOT NULL "
                    "DEFAULT 0, last_failure REAL, locked_until REAL, last_login TEXT)")


def hash_password(password: str, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """scrypt hash of a password in our stored form."""
    salt = secrets.token_bytes(16)
    dk = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=32)
    return f"scrypt${n}${r}${p}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` matches the stored hash (constant-time compare)."""
    try:
        _, n, r, p, salt, dk = stored.split("$")
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=_MAXMEM, dklen=32)
    except ValueError:
        return False
    return hmac.compare_digest(got, base64.b64decode(dk))


#: How a hash made with today's parameters begins (older ones are re-hashed at the next login).
CURRENT_PREFIX = f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}$"
#: A hash to compare against when the username does not exist, so the answer takes the same time.
DUMMY_HASH = f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 43 + "="


def check_username(username: Any, param: str = "username") -> str:
    """A valid username, or BadRequest naming the field."""
    if not isinstance(username, str) or not USERNAME_RE.fullmatch(username):
        raise BadRequest(f"{param}: 1-{MAX_USERNAME_CHARS} letters, digits, '.', '_', '@' or '-', "
                         "starting with a letter or digit", param=param, code="invalid_value")
    return username


def check_password(password: Any, min_length: int, param: str = "password") -> str:
    """A password that follows the site's rule, or BadRequest naming the field."""
    if not isinstance(password, str):
        raise BadRequest(f"{param} must be a string", param=param, code="invalid_value")
    if len(password) > MAX_PASSWORD_CHARS:
        raise BadRequest(f"{param} is longer than {MAX_PASSWORD_CHARS} characters", param=param,
                         code="password_too_long")
    if len(password) < min_length:
        raise BadRequest(f"{param} must have at least {min_length} characters", param=param,
                         code="password_too_short")
    return password


def check_role(role: Any) -> str:
    """A known role, or BadRequest."""
    if role not in ROLES:
        raise BadRequest(f"role must be one of {', '.join(ROLES)}", param="role", code="invalid_value")
    return str(role)


@dataclass(frozen=True)
class Actor:
    """Who asks for an account change and from where (for the audit row)."""

    name: str
    source: str | None = None


def _row(conn: sqlite3.Connection, username: str) -> tuple[Any, ...]:
    row = conn.execute("SELECT username, role, disabled FROM users WHERE username = ?", [username]).fetchone()
    if row is None:
        raise UserNotFound(f"no user named {username!r}", param="username")
    return tuple(row)


def _audit(conn: sqlite3.Connection, actor: Actor, action: str, username: str, **detail: Any) -> None:
    audit.append(conn, audit.Event(action, principal=actor.name, source=actor.source, object=f"user:{username}",
                                   detail=detail or None))


def create_user(conn: sqlite3.Connection, username: str, pw_hash: str, role: str, actor: Actor) -> None:
    """Add a user (password already hashed, validated by the caller); audited user.created."""
    check_username(username)
    check_role(role)
    with audit.transaction(conn):
        if conn.execute("SELECT 1 FROM users WHERE username = ?", [username]).fetchone():
            raise UserExists(f"a user named {username!r} already exists", param="username")
        now = now_iso()
        conn.execute("INSERT INTO users (username, role, pw_hash, created, changed) VALUES (?,?,?,?,?)",
                     [username, role, pw_hash, now, now])
        _audit(conn, actor, "user.created", username, role=role)


def list_users(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every user (never the hash)."""
    cols = ("username", "role", "created", "changed", "disabled", "locked_until", "last_login")
    return [dict(zip(cols, r, strict=True)) for r in conn.execute(
        "SELECT username, role, created, changed, disabled, locked_until, last_login FROM users "
        "ORDER BY username").fetchall()]


def count_users(conn: sqlite3.Connection) -> int:
    """Number of accounts."""
    return int(conn.execute("SELECT count(*) FROM users").fetchone()[0])


def set_password(conn: sqlite3.Connection, username: str, pw_hash: str, actor: Actor) -> None:
    """Replace a user's password; unlocks the account and ends its sessions (audited user.changed)."""
    with audit.transaction(conn):
        _row(conn, username)
        conn.execute("UPDATE users SET pw_hash = ?, changed = ?, failures = 0, locked_until = NULL "
                     "WHERE username = ?", [pw_hash, now_iso(), username])
        _audit(conn, actor, "user.changed", username, change="password")
        end_user_sessions(conn, username, "password_changed", actor)


def set_role(conn: sqlite3.Connection, username: str, role: str, actor: Actor) -> None:
    """Change a user's role; ends its sessions (audited user.role_changed)."""
    check_role(role)
    with audit.transaction(conn):
        old = _row(conn, username)[1]
        if old == role:
            return
        conn.execute("UPDATE users SET role = ?, changed = ? WHERE username = ?", [role, now_iso(), username])
        _audit(conn, actor, "user.role_changed", username, old=old, new=role)
        end_user_sessions(conn, username, "role_changed", actor)


def set_disabled(conn: sqlite3.Connection, username: str, disabled: bool, actor: Actor) -> None:
    """Disable (ending every session at once) or enable a user (clearing a lockout)."""
    with audit.transaction(conn):
        was = _row(conn, username)[2]
        if disabled and not was:
            conn.execute("UPDATE users SET disabled = ?, changed = ? WHERE username = ?",
                         [now_iso(), now_iso(), username])
            _audit(conn, actor, "user.disabled", username)
            end_user_sessions(conn, username, "user_disabled", actor)
        elif not disabled:
            conn.execute("UPDATE users SET disabled = NULL, failures = 0, locked_until = NULL, changed = ? "
                         "WHERE username = ?", [now_iso(), username])
            _audit(conn, actor, "user.enabled", username)


def delete_user(conn: sqlite3.Connection, username: str, actor: Actor) -> None:
    """Delete a user and end its sessions (audited user.deleted)."""
    with audit.transaction(conn):
        _row(conn, username)
        end_user_sessions(conn, username, "user_deleted", actor)
        conn.execute("DELETE FROM users WHERE username = ?", [username])
        _audit(conn, actor, "user.deleted", username)


def end_user_sessions(conn: sqlite3.Connection, username: str, reason: str, actor: Actor) -> int:
    """Revoke every open session of a user (inside the caller's transaction); audited session.revoked."""
    n = conn.execute("UPDATE sessions SET ended = ?, end_reason = ? WHERE username = ? AND ended IS NULL",
                     [now_iso(), reason, username]).rowcount
    if n:
        _audit(conn, actor, "session.revoked", username, reason=reason, sessions=n)
    return int(n)


def login_row(conn: sqlite3.Connection, username: str) -> tuple[str, str, str | None, int, float | None,
                                                                 float | None] | None:
    """(role, pw_hash, disabled, failures, last_failure, locked_until) of a user, or None."""
    r = conn.execute("SELECT role, pw_hash, disabled, failures, last_failure, locked_until FROM users "
                     "WHERE username = ?", [username]).fetchone()
    return tuple(r) if r else None
