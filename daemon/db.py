"""The state database (SQLite through sqlite-utils): tokens, usage metadata, audit log.

Schema changes are named migrations applied in order inside a transaction and
recorded in `_migrations`, so an upgraded daemon brings an old database forward and
never applies a step twice. In the daemon every call goes through one thread
(`StateDB.run`), so SQLite never blocks the event loop and there is one writer; the
CLI calls the same methods directly.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

log = logging.getLogger(__name__)
T = TypeVar("T")


def _m001_initial(db: sqlite_utils.Database) -> None:
    db.table("tokens").create({"id": str, "name": str, "role": str, "hash": str, "created": str,
                         "revoked": str, "last_used": str}, pk="id")
    db.table("tokens").create_index(["name"], unique=True)
    db.table("usage").create({"id": int, "ts": str, "principal": str, "endpoint": str, "model": str,
                        "digest": str, "prompt_tokens": int, "completion_tokens": int, "latency_ms": float,
                        "ttft_ms": float, "status": str, "http_status": int, "prompt_text": str,
                        "completion_text": str}, pk="id")
    db.table("usage").create_index(["ts"])
    db.table("audit").create({"id": int, "ts": str, "actor": str, "action": str, "outcome": str,
                        "detail": str}, pk="id")


def _m_security(db: sqlite_utils.Database) -> None:
    # The security modules import this one; import them when the step runs.
    from daemon import accounts, audit, sessions, token_limits

    audit.migrate_chain(db)
    accounts.migrate_users(db)
    sessions.migrate_sessions(db)
    token_limits.migrate_token_limits(db)


MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("001_initial", _m001_initial),
    ("010_accounts_sessions_audit_chain", _m_security),
]


def now_iso() -> str:
    """Current UTC time as ISO 8601 with milliseconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply pending migrations in order; return the names applied."""
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied TEXT)")
    done = {r[0] for r in db.execute("SELECT name FROM _migrations").fetchall()}
    applied = []
    for name, step in MIGRATIONS:
        if name in done:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            step(db)
            db.execute("INSERT INTO _migrations (name, applied) VALUES (?, ?)", [name, now_iso()])
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        applied.append(name)
        log.info("state database: applied migration %s", name)
    return applied


class StateDB:
    """The state database, opened and migrated."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA synchronous=NORMAL")
        self.path = path
        self.db = sqlite_utils.Database(conn)
        migrate(self.db)
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the single DB thread used from the event loop."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="statedb")

    async def stop(self) -> None:
        """Finish pending writes and close."""
        if self._executor:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.db.conn.close()

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a DB method on the DB thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    # -- usage and audit ---------------------------------------------------------------

    def record_usage(self, row: dict[str, Any]) -> None:
        """Store one request's usage metadata."""
        self.db.table("usage").insert({"ts": now_iso(), **row})

    def purge_prompt_text(self, older_than: str) -> int:
        """Blank the prompt and completion text of usage rows older than the ISO time; return rows changed."""
        cur = self.db.execute("UPDATE usage SET prompt_text = NULL, completion_text = NULL WHERE ts < ? AND "
                              "(prompt_text IS NOT NULL OR completion_text IS NOT NULL)", [older_than])
        return int(cur.rowcount)

    def purge_usage(self, older_than: str) -> int:
        """Delete usage rows older than the ISO time (the retention); return rows deleted."""
        return int(self.db.execute("DELETE FROM usage WHERE ts < ?", [older_than]).rowcount)

    def touch_token(self, token_id: str, when: str) -> None:
        """Record when a token was last used (the daemon calls this at most once a minute per token)."""
        self.db.execute("UPDATE tokens SET last_used = ? WHERE id = ?", [when, token_id])

    def usage(self, limit: int = 100) -> list[dict[str, Any]]:
        """Most recent usage rows, newest first."""
        return list(self.db.query("SELECT * FROM usage ORDER BY id DESC LIMIT ?", [limit]))

    def audit(self, actor: str, action: str, outcome: str = "ok", **detail: Any) -> None:
        """Append an event to the hash-chained audit log (daemon.audit)."""
        from daemon import audit

        audit.append(self.db.conn, audit.Event(action, principal=actor, outcome=outcome,
                                               reason=detail.pop("code", None) if outcome != "ok" else None,
                                               detail=detail))

    def audit_log(self, limit: int = 100) -> list[dict[str, Any]]:
        """Most recent audit records, newest first."""
        from daemon import audit

        return audit.query(self.db.conn, {}, limit)
