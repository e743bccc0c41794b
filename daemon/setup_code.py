"""The one-time setup code that replaces a printed admin token on a fresh box.

With no accounts and no tokens, the daemon writes a short-lived code (60 random bits,
`XXXX-XXXX-XXXX`) to `<state dir>/setup-code` (mode 0600, JSON with the code and its expiry)
and prints it with the URL. `POST /auth/setup {code, username, password}` spends it: the
first admin account is created and the file removed, in one step; a second use, an
expired code or a box that already has an account is refused. The journal then holds
only a spent code, which is no credential.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import sqlite3
import time
from pathlib import Path

from daemon import accounts, audit
from runtime.errors import Unauthorized

FILE = "setup-code"
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U


class SetupRefused(Unauthorized):
    """The setup code is wrong, spent or expired, or the box is already set up."""

    code = "setup_code_invalid"


def needed(conn: sqlite3.Connection) -> bool:
    """Whether the box has no account and no API token."""
    users = conn.execute("SELECT count(*) FROM users").fetchone()[0]
    tokens = conn.execute("SELECT count(*) FROM tokens").fetchone()[0]
    return users == 0 and tokens == 0


def create(state_dir: Path, minutes: float) -> str:
    """Write a fresh code (replacing any older one) to the 0600 file; return it."""
    code = "-".join("".join(secrets.choice(_ALPHABET) for _ in range(4)) for _ in range(3))
    path = state_dir / FILE
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"code": code, "expires": time.time() + minutes * 60}, f)
    os.replace(tmp, path)
    return code


def use(state_dir: Path, conn: sqlite3.Connection, code: str, username: str, pw_hash: str,
        source: str | None) -> None:
    """Spend the code: create the first admin account, remove the file; audited setup.used / setup.refused."""
    path = state_dir / FILE
    try:
        saved = json.loads(path.read_text())
        stored, expires = str(saved["code"]), float(saved["expires"])
    except (OSError, ValueError, KeyError, TypeError):
        stored, expires = "", 0.0
    presented = code.strip().upper()
    match = bool(stored) and hmac.compare_digest(stored.encode(), presented.encode())
    reason = ("no_code" if not stored else "wrong_code" if not match else
              "expired" if time.time() > expires else None)
    with audit.transaction(conn):
        if reason is None and not needed(conn):
            reason = "already_set_up"
        if reason:
            audit.append(conn, audit.Event("setup.refused", principal=username, source=source, outcome="refused",
                                           reason=reason))
        else:
            accounts.create_user(conn, username, pw_hash, "admin", accounts.Actor("setup-code", source))
            audit.append(conn, audit.Event("setup.used", principal=username, source=source,
                                           object=f"user:{username}"))
    if reason in ("expired", "already_set_up") or reason is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if reason == "expired":
        raise SetupRefused("the setup code has expired; restart the daemon for a new one, or run "
                           "`atoll user create --role admin NAME` on the box", code="setup_code_expired")
    if reason:
        raise SetupRefused("invalid or already used setup code")
