"""The tamper-evident audit log: an append-only SHA-256 hash chain in the state DB.

Each row is (seq, ts, principal, source, action, object, outcome, reason, detail,
prev_hash, hash). `hash` is the SHA-256 (hex) of the row's *canonical encoding*: the
JSON object of every field but `hash`, serialised per RFC 8785 (JSON Canonicalization
Scheme) and encoded as UTF-8. Our rows only hold strings, integers below 2^53, booleans,
null, arrays and objects (floats and bigger integers are stored as strings), and for
those values RFC 8785 is exactly Python's
`json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`.
`prev_hash` is the previous row's `hash` (64 zeros for the first row ever, or the head
of the signed checkpoint at a retention cut). AUDIT.md, beside the README, explains how an auditor
checks all this by hand.

Writers take SQLite's write lock (BEGIN IMMEDIATE) around read-head-then-insert, so the
daemon's DB thread and an on-box CLI command can append at the same time without
forking the chain.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import Any

log = logging.getLogger(__name__)

GENESIS = "0" * 64
FIELDS = ("seq", "ts", "principal", "source", "action", "object", "outcome", "reason", "detail", "prev_hash")
OUTCOMES = ("ok", "failed", "refused", "denied", "locked", "expired", "info")
_MAX_TEXT = 4096


def utc_now() -> str:
    """Current UTC time as `YYYY-MM-DDTHH:MM:SS.mmmZ` (the audit log's one time format)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _text(s: str) -> str:
    # Lone surrogates cannot be UTF-8; cap lengths so one event cannot bloat the log.
    return s.encode("utf-8", "replace").decode("utf-8")[:_MAX_TEXT]


def normalize(value: Any) -> Any:
    """Turn a detail value into what the canonical encoding allows (str, int < 2^53, bool, None, list, dict)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**53 else str(value)
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        return {_text(str(k)): normalize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalize(v) for v in value]
    return _text(str(value))


def canonical(value: Any) -> str:
    """RFC 8785 encoding of a normalized value (see the module docstring for why json.dumps is exact here)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _s(v: str | None) -> str:
    # the C string encoder behind json.dumps(v, ensure_ascii=False): same bytes, several times faster
    return "null" if v is None else encode_basestring(v)


def row_bytes(seq: int, ts: str, principal: str | None, source: str | None, action: str, obj: str | None,
              outcome: str, reason: str | None, detail_json: str, prev_hash: str) -> bytes:
    """The canonical encoding of one row as stored (detail already canonical JSON text), keys in RFC 8785 order."""
    return (f'{{"action":{_s(action)},"detail":{detail_json},"object":{_s(obj)},"outcome":{_s(outcome)},'
            f'"prev_hash":{_s(prev_hash)},"principal":{_s(principal)},"reason":{_s(reason)},"seq":{seq},'
            f'"source":{_s(source)},"ts":{_s(ts)}}}').encode()


def row_hash(data: bytes) -> str:
    """SHA-256 hex of a canonical row."""
    return hashlib.sha256(data).hexdigest()


def migrate_chain(db: Any) -> None:
    """Migration: the audit_chain and audit_anchor tables; rows of the old plain audit table are carried over."""
    conn: sqlite3.Connection = db.conn
    conn.execute("CREATE TABLE audit_chain (seq INTEGER PRIMARY KEY, ts TEXT NOT NULL, principal TEXT, "
                 "source TEXT, action TEXT NOT NULL, object TEXT, outcome TEXT NOT NULL, reason TEXT, "
                 "detail TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL)")
    conn.execute("CREATE INDEX audit_chain_ts ON audit_chain (ts)")
    conn.execute("CREATE INDEX audit_chain_action ON audit_chain (action)")
    conn.execute("CREATE TABLE audit_anchor (size INTEGER PRIMARY KEY, head TEXT NOT NULL, ts TEXT NOT NULL, "
                 "checkpoint TEXT NOT NULL)")
    old = conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='audit'").fetchone()
    if old:
        for ts, actor, action, outcome, detail in conn.execute(
                "SELECT ts, actor, action, outcome, detail FROM audit ORDER BY id").fetchall():
            try:
                d = json.loads(detail) if detail else {}
            except ValueError:
                d = {"raw": detail}
            _insert(conn, Event(action=action, principal=actor, outcome=outcome,
                                detail={**(d if isinstance(d, dict) else {"value": d}), "legacy": True}), ts=ts)


@dataclass(frozen=True)
class Event:
    """One security-relevant event, before it gets its place in the chain."""

    action: str
    principal: str | None = None
    source: str | None = None
    object: str | None = None
    outcome: str = "ok"
    reason: str | None = None
    detail: dict[str, Any] | None = None


def head(conn: sqlite3.Connection) -> tuple[int, str]:
    """(size, head hash) of the log: the last row's seq and hash, or the newest retention cut's."""
    row = conn.execute("SELECT seq, hash FROM audit_chain ORDER BY seq DESC LIMIT 1").fetchone()
    if row:
        return int(row[0]), str(row[1])
    anchor = conn.execute("SELECT size, head FROM audit_anchor ORDER BY size DESC LIMIT 1").fetchone()
    return (int(anchor[0]), str(anchor[1])) if anchor else (0, GENESIS)


def _insert(conn: sqlite3.Connection, ev: Event, ts: str | None = None) -> tuple[int, str]:
    size, prev = head(conn)
    seq, ts = size + 1, ts or utc_now()
    principal = _text(ev.principal) if ev.principal is not None else None
    source = _text(ev.source) if ev.source is not None else None
    obj = _text(ev.object) if ev.object is not None else None
    reason = _text(ev.reason) if ev.reason is not None else None
    action, outcome = _text(ev.action), _text(ev.outcome)
    detail = canonical(normalize(ev.detail or {}))
    h = row_hash(row_bytes(seq, ts, principal, source, action, obj, outcome, reason, detail, prev))
    conn.execute("INSERT INTO audit_chain (seq, ts, principal, source, action, object, outcome, reason, detail, "
                 "prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                 [seq, ts, principal, source, action, obj, outcome, reason, detail, prev, h])
    return seq, h


class transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error); joins a transaction the caller already holds."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn, self.own = conn, not conn.in_transaction

    def __enter__(self) -> None:
        if self.own:
            self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, et: Any, *_: Any) -> None:
        if self.own:
            self.conn.execute("ROLLBACK" if et else "COMMIT")


def append(conn: sqlite3.Connection, ev: Event) -> int:
    """Append one event as a new row under SQLite's write lock; return its seq."""
    with transaction(conn):
        return _insert(conn, ev)[0]


def iter_rows(conn: sqlite3.Connection, after_seq: int = 0) -> Iterator[tuple[Any, ...]]:
    """Every stored row from seq > after_seq, in order, as (seq, ts, principal, source, action, object,
    outcome, reason, detail, prev_hash, hash) tuples."""
    cur = conn.execute("SELECT seq, ts, principal, source, action, object, outcome, reason, detail, prev_hash, "
                       "hash FROM audit_chain WHERE seq > ? ORDER BY seq", [after_seq])
    while batch := cur.fetchmany(10_000):
        yield from batch


def row_json(r: tuple[Any, ...]) -> dict[str, Any]:
    """A stored row as the API and the export show it."""
    try:
        detail = json.loads(r[8])
    except ValueError:
        detail = r[8]
    return {"seq": r[0], "ts": r[1], "principal": r[2], "source": r[3], "action": r[4], "object": r[5],
            "outcome": r[6], "reason": r[7], "detail": detail, "prev_hash": r[9], "hash": r[10]}


_FILTERS = {"action": "action = ?", "principal": "principal = ?", "outcome": "outcome = ?",
            "since": "ts >= ?", "until": "ts < ?", "after": "seq > ?", "before": "seq < ?"}


def query(conn: sqlite3.Connection, filters: dict[str, Any], limit: int, newest_first: bool = True
          ) -> list[dict[str, Any]]:
    """Rows matching the filters (keys of _FILTERS), at most `limit`, for GET /admin/audit."""
    where = [_FILTERS[k] for k in _FILTERS if filters.get(k) is not None]
    args = [filters[k] for k in _FILTERS if filters.get(k) is not None]
    clauses = f"WHERE {' AND '.join(where)}" if where else ""
    order = "DESC" if newest_first else "ASC"
    sql = ("SELECT seq, ts, principal, source, action, object, outcome, reason, detail, prev_hash, hash "  # noqa: S608
           f"FROM audit_chain {clauses} ORDER BY seq {order} LIMIT ?")  # fixed clauses; values are parameters
    return [row_json(r) for r in conn.execute(sql, [*args, limit]).fetchall()]
