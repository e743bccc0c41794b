"""The daemon's security parts in one typed container: login throttle, token limiter, device key, TLS,
the governor's critical/recovery events in the audit log, and audit retention by signed policy."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from daemon import audit, audit_verify, device_key
from daemon.db import StateDB
from daemon.login import Throttle
from daemon.tls import TlsInfo
from daemon.token_limits import TokenLimiter
from hardware.governor import Governor, Snapshot, State, Transition

log = logging.getLogger(__name__)


@dataclass
class Security:
    """Per-daemon security state (nothing here is module-level)."""

    key: Ed25519PrivateKey
    throttle: Throttle = field(default_factory=Throttle)
    limiter: TokenLimiter = field(default_factory=TokenLimiter)
    tls: TlsInfo | None = None
    idle_seconds: float = 1800.0
    absolute_seconds: float = 43200.0
    lockout_seconds: float = 900.0
    password_min_length: int = 12
    retention_every: float = 3600.0
    _task: asyncio.Task[None] | None = None

    async def start(self, db: StateDB, governor: Governor, retention_days: Callable[[], int]) -> None:
        """Audit the governor's critical and recovery transitions; prune the audit log by retention policy."""
        async def on_transition(tr: Transition, _: Snapshot) -> None:
            if State.CRITICAL in (tr.to_state, tr.from_state):
                action = "governor.critical" if tr.to_state == State.CRITICAL else "governor.recovered"
                await db.run(audit.append, db.db.conn, audit.Event(
                    action, principal="governor", outcome="info", reason=tr.reason,
                    detail={"from": tr.from_state.name.lower(), "to": tr.to_state.name.lower()}))

        governor.on_transition(on_transition)
        self._task = asyncio.create_task(self._retention(db, retention_days), name="atoll-audit-retention")

    async def stop(self) -> None:
        """Stop the retention loop."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _retention(self, db: StateDB, retention_days: Callable[[], int]) -> None:
        while True:
            await self.retain(db, retention_days())
            await asyncio.sleep(self.retention_every)

    async def retain(self, db: StateDB, days: int) -> int:
        """Prune audit rows older than `days` (0: keep all) behind a signed checkpoint; rows removed."""
        if not days:
            return 0
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
        before = cutoff.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        try:
            n = await db.run(audit_verify.prune, db.db.conn, self.key, before, "retention-policy")
        except Exception as e:  # keep the loop; the reason is logged and `audit verify` shows it
            log.error("audit retention: not pruning: %s", getattr(e, "message", e))
            return 0
        if n:
            log.info("audit retention: pruned %d rows older than %s behind a signed checkpoint", n, before)
        return n

    def status(self) -> dict[str, Any]:
        """For GET /admin/status."""
        return {"device_key": device_key.key_id(self.key.public_key())}

    @classmethod
    def open(cls, state_dir: Path, db: StateDB, *, idle_minutes: float, absolute_hours: float,
             lockout_minutes: float, backoff_seconds: float, password_min_length: int) -> Security:
        """Load (or at first start create) the device key and build the container."""
        first = not (state_dir / device_key.PRIVATE_NAME).exists()
        key = device_key.ensure(state_dir)
        if first:
            audit.append(db.db.conn, audit.Event("device_key.created", principal="atoll",
                                                 object=f"device-key:{device_key.key_id(key.public_key())}"))
        return cls(key=key, throttle=Throttle(backoff=backoff_seconds), idle_seconds=idle_minutes * 60,
                   absolute_seconds=absolute_hours * 3600, lockout_seconds=lockout_minutes * 60,
                   password_min_length=password_min_length)
