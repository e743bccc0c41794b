"""The daemon's security parts in one typed container: login throttle, token limiter, device key, TLS."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from daemon import audit, device_key
from daemon.db import StateDB
from daemon.login import Throttle
from daemon.tls import TlsInfo
from daemon.token_limits import TokenLimiter

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
