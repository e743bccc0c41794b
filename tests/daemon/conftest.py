"""Fixtures for the security tests: the real app over a state dir with no models (nothing to load)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from daemon import accounts
from daemon.app import create_app
from daemon.auth import create_token
from daemon.config import Settings
from daemon.services import Services, bootstrap

PASSWORD = "correct horse battery"
ATOLL = str(Path(sys.executable).with_name("atoll"))


def atoll(*args: str | Path, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `atoll ARGS` (no ATOLL_* variables inherited), optionally feeding stdin."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATOLL_")}
    return subprocess.run([ATOLL, *map(str, args)], capture_output=True, text=True, timeout=120, env=env,
                          input=input_text if input_text is not None else "", check=False)


class SecApp:
    """A running in-process daemon with no models, and helpers to make people and log them in."""

    def __init__(self, client: TestClient[Any, Any], services: Services) -> None:
        self.client = client
        self.services = services
        self.settings = services.settings
        self.conn: sqlite3.Connection = services.db.db.conn

    def add_user(self, name: str, role: str = "user", password: str = PASSWORD) -> None:
        """Create an account directly in the state DB (as `atoll user create` does)."""
        accounts.create_user(self.conn, name, accounts.hash_password(password), role, accounts.Actor("test"))

    def token(self, name: str, role: str) -> dict[str, str]:
        """A bearer header for a new API token."""
        return {"Authorization": f"Bearer {create_token(self.services.db, name, role)}"}

    async def login(self, name: str, password: str = PASSWORD) -> dict[str, str]:
        """Log in; return the headers a same-origin page would send on a state change (CSRF, Origin)."""
        r = await self.client.post("/auth/login", json={"username": name, "password": password})
        assert r.status == 200, await r.text()
        body = await r.json()
        return {"X-CSRF-Token": body["csrf_token"], "Origin": self.origin}

    @property
    def origin(self) -> str:
        """This server's origin as a browser would send it."""
        return f"http://{self.client.host}:{self.client.port}"

    def rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Query the state DB."""
        return self.conn.execute(sql, args).fetchall()

    def audit(self, action: str | None = None) -> list[tuple[Any, ...]]:
        """(principal, source, action, object, outcome, reason) rows, oldest first."""
        rows = self.rows("SELECT principal, source, action, object, outcome, reason FROM audit_chain ORDER BY seq")
        return [r for r in rows if action is None or r[2] == action]

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every security table (for 'state unchanged' checks)."""
        out = {t: self.rows(f"SELECT * FROM {t}") for t in  # noqa: S608 - fixed table names
               ("users", "sessions", "audit_chain", "audit_anchor")}
        # tokens without last_used, which every successful use may touch
        out["tokens"] = self.rows("SELECT id, name, role, hash, created, revoked, expires, rate_per_minute, "
                                  "daily_token_quota, created_by FROM tokens")
        return out


@pytest.fixture
async def sec_app(aiohttp_client: Any, tmp_path: Path) -> Callable[..., Any]:
    """Factory: the real app over an empty state dir (no models), settings overrides allowed."""

    async def make(**overrides: Any) -> SecApp:
        overrides.setdefault("usb_watch", False)
        overrides.setdefault("login_backoff_seconds", 0.0)
        settings = Settings(state_dir=overrides.pop("state_dir", tmp_path / "state"), threads=1, **overrides)
        services = bootstrap(settings)
        client = await aiohttp_client(create_app(settings, services))
        return SecApp(client, services)

    return make
