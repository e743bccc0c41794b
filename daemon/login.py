"""Password login with throttling: exponential back-off per account and per source, lockout on the 6th miss.

After n wrong passwords in a row for a username (or from a source address), the next try
is refused with 429 `login_throttled` until `backoff * 2^(n-1)` seconds (at most 5 min)
have passed since the last miss; such a refused try is not checked and not counted. The
LOCKOUT_AFTER-th (6th) miss in a row locks the account for `lockout_minutes`
(429 `account_locked`, audited `login.locked`). Usernames that do not exist are tracked
the same way in memory, and are checked against a dummy hash of the same cost, so an
unknown username and a wrong password get the same answer in the same time, and
even a lockout cannot tell them apart. A disabled account answers as a wrong password.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from daemon import accounts, audit, sessions
from daemon.db import StateDB, now_iso
from runtime.errors import AtollError, Unauthorized

LOCKOUT_AFTER = 6
MAX_DELAY = 300.0
SOURCE_FORGET = 900.0
_MAX_TRACKED = 10_000


class LoginThrottled(AtollError):
    """Too many wrong passwords: wait for Retry-After."""

    status, type, code = 429, "rate_limit_error", "login_throttled"


class AccountLocked(LoginThrottled):
    """The account is locked after repeated wrong passwords."""

    code = "account_locked"


def bad_credentials() -> Unauthorized:
    """The one answer for an unknown user, a wrong password and a disabled account."""
    return Unauthorized("invalid username or password", code="invalid_credentials")


@dataclass
class _Misses:
    failures: int = 0
    last: float = 0.0
    locked_until: float = 0.0


@dataclass
class Throttle:
    """In-memory miss counters: per source address, and per username that has no account."""

    backoff: float = 1.0
    sources: OrderedDict[str, _Misses] = field(default_factory=OrderedDict)
    unknown: OrderedDict[str, _Misses] = field(default_factory=OrderedDict)
    hashing: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))

    def delay(self, failures: int) -> float:
        """Seconds to wait after `failures` misses in a row."""
        return 0.0 if failures <= 0 else min(MAX_DELAY, self.backoff * 2 ** (failures - 1))

    @staticmethod
    def _get(table: OrderedDict[str, _Misses], key: str) -> _Misses:
        m = table.get(key)
        if m is None:
            m = table[key] = _Misses()
            while len(table) > _MAX_TRACKED:
                table.popitem(last=False)
        return m

    def check(self, failures: int, last: float, locked_until: float, now: float) -> None:
        """Raise when a try must wait (lockout or back-off)."""
        if locked_until > now:
            raise AccountLocked("this account is locked after repeated wrong passwords; try again later",
                                retry_after=max(1, int(locked_until - now + 0.999)))
        wait = last + self.delay(failures) - now
        if failures and wait > 0:
            raise LoginThrottled("too many wrong passwords; wait before trying again",
                                 retry_after=max(1, int(wait + 0.999)))


@dataclass(frozen=True)
class LoginResult:
    """A successful login: the cookie value, its CSRF token, the user's role."""

    secret: str
    csrf: str
    username: str
    role: str


async def login(db: StateDB, throttle: Throttle, username: str, password: str, source: str,
                lockout_seconds: float) -> LoginResult:
    """Check a username and password (already length-checked) and open a session, or raise."""
    now = time.time()
    src = throttle.sources.get(source)
    if src and now - src.last > SOURCE_FORGET:
        src.failures = 0
    if src:
        throttle.check(src.failures, src.last, 0.0, now)
    row = await db.run(accounts.login_row, db.db.conn, username)
    mem = None if row else throttle._get(throttle.unknown, username)
    if row:
        failures, last, locked = row[3], row[4] or 0.0, row[5] or 0.0
    else:
        assert mem is not None
        failures, last, locked = mem.failures, mem.last, mem.locked_until
    if locked and locked <= now:
        failures = 0
    throttle.check(failures, last, locked, now)
    async with throttle.hashing:
        ok = await asyncio.to_thread(accounts.verify_password, password, row[1] if row else accounts.DUMMY_HASH)
    now = time.time()  # back-off counts from the answer, not from the start of the hash
    if ok and row and not row[2]:
        if not row[1].startswith(accounts.CURRENT_PREFIX):  # hashed with older parameters: bring it up to date
            async with throttle.hashing:
                fresh = await asyncio.to_thread(accounts.hash_password, password)
            await db.run(lambda: db.db.conn.execute("UPDATE users SET pw_hash = ? WHERE username = ?",
                                                    [fresh, username]))
        secret = await db.run(_succeed, db, username, source)
        if src:
            src.failures = 0
        return LoginResult(secret, sessions.csrf_token(secret), username, row[0])
    s = throttle._get(throttle.sources, source)
    s.failures, s.last = s.failures + 1, now
    why = "disabled" if ok and row else "wrong_password" if row else "unknown_user"
    if ok:  # a disabled account with the right password: not a miss against it
        await db.run(_audit, db, "login.failed", "failed", username, source, why, failures)
        raise bad_credentials()
    if row:  # counted in SQL, so two tries at once cannot both see the same count
        failures = await db.run(_record_miss, db, username, now, lockout_seconds)
    else:
        assert mem is not None
        failures = failures + 1
        mem.failures, mem.last = failures, now
        mem.locked_until = now + lockout_seconds if failures >= LOCKOUT_AFTER else 0.0
    locked_now = failures >= LOCKOUT_AFTER
    if locked_now:
        await db.run(_audit, db, "login.locked", "locked", username, source, why, failures)
        raise AccountLocked("this account is locked after repeated wrong passwords; try again later",
                            retry_after=max(1, int(lockout_seconds)))
    await db.run(_audit, db, "login.failed", "failed", username, source, why, failures)
    raise bad_credentials()


def _audit(db: StateDB, action: str, outcome: str, username: str, source: str, why: str, failures: int) -> None:
    audit.append(db.db.conn, audit.Event(action, principal=username, source=source, object=f"user:{username}",
                                         outcome=outcome, reason=why, detail={"failures_in_a_row": failures}))


def _record_miss(db: StateDB, username: str, now: float, lockout_seconds: float) -> int:
    """Count one more miss (restarting after an expired lock); lock on the LOCKOUT_AFTER-th; return the count."""
    conn = db.db.conn
    with audit.transaction(conn):
        conn.execute("UPDATE users SET failures = CASE WHEN locked_until IS NOT NULL AND locked_until <= ? THEN 1 "
                     "ELSE failures + 1 END, last_failure = ?, locked_until = NULL WHERE username = ?",
                     [now, now, username])
        n = int(conn.execute("SELECT failures FROM users WHERE username = ?", [username]).fetchone()[0])
        if n >= LOCKOUT_AFTER:
            conn.execute("UPDATE users SET locked_until = ? WHERE username = ?", [now + lockout_seconds, username])
    return n


def _succeed(db: StateDB, username: str, source: str) -> str:
    conn = db.db.conn
    with audit.transaction(conn):
        conn.execute("UPDATE users SET failures = 0, last_failure = NULL, locked_until = NULL, last_login = ? "
                     "WHERE username = ?", [now_iso(), username])
        secret = sessions.create(conn, username, source)
        audit.append(conn, audit.Event("login.ok", principal=username, source=source, object=f"user:{username}"))
    return secret
