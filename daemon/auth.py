"""Bearer tokens: created with a role, stored hashed, compared in constant time, revocable.

A token reads `atoll_<id>_<secret>`. The id (8 hex chars) is stored in clear to find
the row; only the SHA-256 of the secret is stored, and it is compared with
hmac.compare_digest. The secret is 256 random bits, so a fast hash is enough (there is
nothing to brute-force the way there is with a password).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

from daemon.db import StateDB, now_iso
from runtime.errors import BadRequest, Unauthorized

ROLES = ("user", "admin", "auditor")
TOKEN_RE = re.compile(r"^atoll_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name and role."""

    name: str
    role: str
    kind: str = "token"  # "token" or "session"
    token_id: str = ""

    @property
    def is_admin(self) -> bool:
        """Whether this principal may use admin routes."""
        return self.role == "admin"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(db: StateDB, name: str, role: str, by: str = "local-admin") -> str:
    """Create a token; return it in clear (the only time it exists in clear)."""
    if role not in ROLES:
        raise BadRequest(f"unknown role {role!r}: one of {', '.join(ROLES)}", param="role")
    if not NAME_RE.fullmatch(name):
        raise BadRequest(f"bad token name {name!r}: 1-64 letters, digits, '.', '_', '@' or '-'", param="name")
    if db.db.execute("SELECT 1 FROM tokens WHERE name = ?", [name]).fetchone():
        raise BadRequest(f"a token named {name!r} already exists (revoke it first)", param="name",
                         code="token_exists")
    tid = secrets.token_hex(4)
    while db.db.execute("SELECT 1 FROM tokens WHERE id = ?", [tid]).fetchone():
        tid = secrets.token_hex(4)
    secret = secrets.token_urlsafe(32)
    db.db.table("tokens").insert({"id": tid, "name": name, "role": role, "hash": _hash(secret),
                            "created": now_iso(), "revoked": None, "last_used": None})
    db.audit(by, "token.create", name=name, role=role)
    return f"atoll_{tid}_{secret}"


def verify_token(db: StateDB, token: str) -> Principal:
    """Return the principal for a presented token, or raise Unauthorized."""
    m = TOKEN_RE.fullmatch(token)
    row = db.db.execute("SELECT name, role, hash, revoked FROM tokens WHERE id = ?",
                        [m.group(1)]).fetchone() if m else None
    # Compare even when there is no row, so timing does not tell which part was wrong.
    presented = _hash(m.group(2)) if m else _hash(token)
    stored = row[2] if row else "0" * 64
    if not hmac.compare_digest(presented, stored) or row is None:
        raise Unauthorized("invalid API token")
    if row[3]:
        raise Unauthorized("this API token has been revoked", code="token_revoked")
    return Principal(name=row[0], role=row[1], token_id=m.group(1) if m else "")


def list_tokens(db: StateDB) -> list[dict[str, Any]]:
    """Every token's name, role and dates (never the secret or its hash)."""
    return list(db.db.query("SELECT name, role, created, revoked, last_used FROM tokens ORDER BY created"))


def revoke_token(db: StateDB, name: str, by: str = "local-admin") -> None:
    """Revoke the token called `name`."""
    row = db.db.execute("SELECT revoked FROM tokens WHERE name = ?", [name]).fetchone()
    if row is None:
        raise BadRequest(f"no token named {name!r}", param="name", code="token_not_found")
    if not row[0]:
        db.db.execute("UPDATE tokens SET revoked = ? WHERE name = ?", [now_iso(), name])
        db.audit(by, "token.revoke", name=name)
