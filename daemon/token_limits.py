"""What an API token may still do: expiry, requests per minute, tokens per UTC day.

Columns added to `tokens`: `expires` (ISO time or NULL), `rate_per_minute` and
`daily_token_quota` (NULL: unlimited), `created_by`. The rate is counted in memory over a
sliding 60 s window per token; the quota is the sum of prompt + completion tokens in
today's (UTC) usage rows of that token, checked before an inference request is admitted
(so the request that crosses the line finishes; the next is refused). Over either →
429 with Retry-After; audited `token.rate_limited` at most once a minute per token, an
expired token `token.expired` once per process.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from daemon import audit
from daemon.auth import create_token
from daemon.db import StateDB
from runtime.errors import AtollError, BadRequest, Unauthorized

INFERENCE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})


class TokenRateLimited(AtollError):
    """The token is over its request rate or its daily quota."""

    status, type, code = 429, "rate_limit_error", "token_rate_limited"


def migrate_token_limits(db: Any) -> None:
    """Migration: expiry, rate and quota columns on tokens; an index to sum a token's usage per day."""
    for col in ("expires TEXT", "rate_per_minute INTEGER", "daily_token_quota INTEGER", "created_by TEXT"):
        db.conn.execute(f"ALTER TABLE tokens ADD COLUMN {col}")
    db.conn.execute("CREATE INDEX IF NOT EXISTS usage_principal_ts ON usage (principal, ts)")


def limits_row(db: StateDB, token_id: str) -> tuple[str, str | None, int | None, int | None] | None:
    """(name, expires, rate_per_minute, daily_token_quota) of a token."""
    r = db.db.conn.execute("SELECT name, expires, rate_per_minute, daily_token_quota FROM tokens WHERE id = ?",
                           [token_id]).fetchone()
    return tuple(r) if r else None


def used_today(db: StateDB, name: str) -> int:
    """Prompt + completion tokens this token used since 00:00 UTC."""
    midnight = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0).isoformat()
    r = db.db.conn.execute("SELECT coalesce(sum(coalesce(prompt_tokens,0) + coalesce(completion_tokens,0)), 0) "
                           "FROM usage WHERE principal = ? AND ts >= ?", [name, midnight]).fetchone()
    return int(r[0])


def create_limited_token(db: StateDB, name: str, role: str, by: str, expires_in_days: int | None = None,
                         rate: int | None = None, quota: int | None = None) -> tuple[str, str | None]:
    """Create a token with its limits in one transaction; return (the token in clear, its expiry or None)."""
    expires = None
    if expires_in_days is not None:
        if not 1 <= expires_in_days <= 3650:
            raise BadRequest("expires_in_days must be 1..3650", param="expires_in_days")
        t = dt.datetime.now(dt.UTC) + dt.timedelta(days=expires_in_days)
        expires = t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    for value, param in ((rate, "rate_per_minute"), (quota, "daily_token_quota")):
        if value is not None and value < 1:
            raise BadRequest(f"{param} must be at least 1", param=param)
    with audit.transaction(db.db.conn):
        token = create_token(db, name, role, by=by)
        db.db.conn.execute("UPDATE tokens SET expires = ?, rate_per_minute = ?, daily_token_quota = ?, "
                           "created_by = ? WHERE name = ?", [expires, rate, quota, by, name])
    return token, expires


def _seconds_to_midnight() -> int:
    now = dt.datetime.now(dt.UTC)
    tomorrow = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((tomorrow - now).total_seconds()))


@dataclass
class TokenLimiter:
    """Per-token request windows and which limit events were already audited."""

    windows: dict[str, deque[float]] = field(default_factory=dict)
    audited: dict[str, float] = field(default_factory=dict)

    def _audit_once(self, db: StateDB, key: str, every: float, ev: audit.Event) -> None:
        now = time.monotonic()
        if now - self.audited.get(key, -1e18) >= every:
            self.audited[key] = now
            audit.append(db.db.conn, ev)

    def admit(self, db: StateDB, token_id: str, path: str, source: str | None) -> None:
        """Raise when the token has expired or is over its rate or quota (runs on the DB thread)."""
        row = limits_row(db, token_id)
        if row is None:
            return
        name, expires, rate, quota = row
        if expires and expires <= audit.utc_now():
            self._audit_once(db, f"exp:{token_id}", 1e18, audit.Event(
                "token.expired", principal=name, source=source, object=f"token:{name}", outcome="expired"))
            raise Unauthorized(f"API token {name!r} expired at {expires}", code="token_expired")
        if rate:
            now = time.monotonic()
            w = self.windows.setdefault(token_id, deque())
            while w and now - w[0] >= 60:
                w.popleft()
            if len(w) >= rate:
                self._limited(db, token_id, name, source, "rate", rate)
                raise TokenRateLimited(f"API token {name!r} is over its limit of {rate} requests per minute",
                                       retry_after=max(1, int(60 - (now - w[0]) + 0.999)))
            w.append(now)
        if quota and path in INFERENCE_PATHS:
            used = used_today(db, name)
            if used >= quota:
                self._limited(db, token_id, name, source, "daily_quota", quota)
                raise TokenRateLimited(f"API token {name!r} has used its daily quota of {quota} tokens "
                                       f"({used} used today, UTC)", code="token_quota_exceeded",
                                       retry_after=_seconds_to_midnight())

    def _limited(self, db: StateDB, token_id: str, name: str, source: str | None, which: str, limit: int) -> None:
        self._audit_once(db, f"{which}:{token_id}", 60.0, audit.Event(
            "token.rate_limited", principal=name, source=source, object=f"token:{name}", outcome="refused",
            reason=which, detail={"limit": limit}))
