"""Signed checkpoints of the audit chain, verifying it, pruning it at a signed cut, exporting it.

A checkpoint (modelled on C2SP signed notes) is UTF-8 text; its first five lines are the
signed body, then an empty line and the signature:

    atoll audit checkpoint v1
    device <key id>
    size <number of rows since the log began, pruned ones included>
    head <hash of row `size`, hex; 64 zeros when size is 0>
    time <YYYY-MM-DDTHH:MM:SS.mmmZ>

    signature <base64 Ed25519 signature of the five body lines, each ending in \\n>
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from daemon import audit
from daemon.device_key import key_id, public_pem
from runtime.errors import BadRequest

MAGIC = "atoll audit checkpoint v1"


class CheckpointError(BadRequest):
    """A checkpoint file is malformed or its signature does not verify."""

    code = "bad_checkpoint"


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement: the log had `size` rows and its head was `head` at `time`."""

    device: str
    size: int
    head: str
    time: str
    signature: bytes

    def body(self) -> bytes:
        """The signed bytes."""
        return (f"{MAGIC}\ndevice {self.device}\nsize {self.size}\nhead {self.head}\ntime {self.time}\n").encode()

    def text(self) -> str:
        """The checkpoint file's content."""
        return self.body().decode() + f"\nsignature {base64.b64encode(self.signature).decode()}\n"


def sign(key: Ed25519PrivateKey, size: int, head: str, time: str | None = None) -> Checkpoint:
    """A checkpoint of (size, head) signed by the device key."""
    unsigned = Checkpoint(key_id(key.public_key()), size, head, time or audit.utc_now(), b"")
    return Checkpoint(unsigned.device, size, head, unsigned.time, key.sign(unsigned.body()))


def parse(text: str, public: Ed25519PublicKey) -> Checkpoint:
    """Parse a checkpoint and check its signature with the device's public key."""
    lines = text.split("\n")
    if len(lines) < 7 or lines[0] != MAGIC or lines[5] != "" or not lines[6].startswith("signature "):
        raise CheckpointError("not an atoll audit checkpoint (AUDIT.md beside the README gives the format)")
    try:
        fields = dict(line.split(" ", 1) for line in lines[1:5])
        cp = Checkpoint(fields["device"], int(fields["size"]), fields["head"], fields["time"],
                        base64.b64decode(lines[6].split(" ", 1)[1], validate=True))
    except (KeyError, ValueError):
        raise CheckpointError("checkpoint fields are malformed") from None
    if cp.device != key_id(public):
        raise CheckpointError(f"checkpoint was signed by device {cp.device}, not this box's key {key_id(public)}")
    try:
        public.verify(cp.signature, cp.body())
    except InvalidSignature:
        raise CheckpointError("checkpoint signature does not verify with the device key") from None
    return cp


@dataclass
class Verdict:
    """What `audit verify` found."""

    ok: bool
    rows: int = 0
    size: int = 0
    head: str = audit.GENESIS
    first_seq: int = 1
    broken_seq: int | None = None
    problem: str | None = None
    checkpoint: dict[str, Any] | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        """JSON form for the API and --json."""
        return dict(self.__dict__)


def _fail(v: Verdict, seq: int | None, problem: str) -> Verdict:
    v.ok, v.broken_seq, v.problem = False, seq, problem
    return v


def verify(conn: sqlite3.Connection, public: Ed25519PublicKey, checkpoint: Checkpoint | None = None) -> Verdict:
    """Walk the chain from the newest signed cut (or genesis); name the first broken row; compare a checkpoint."""
    v = Verdict(ok=True)
    anchor = conn.execute("SELECT size, head, checkpoint FROM audit_anchor ORDER BY size DESC LIMIT 1").fetchone()
    expect_seq, prev = 1, audit.GENESIS
    if anchor:
        try:
            cut = parse(anchor[2], public)
        except CheckpointError as e:
            return _fail(v, None, f"the retention cut's checkpoint is invalid: {e.message}")
        if (cut.size, cut.head) != (anchor[0], anchor[1]):
            return _fail(v, None, "the retention cut's row does not match its signed checkpoint")
        expect_seq, prev = cut.size + 1, cut.head
    v.first_seq = expect_seq
    cp_hash: str | None = None
    for seq, ts, principal, source, action, obj, outcome, reason, detail, prev_hash, h in audit.iter_rows(conn):
        if seq != expect_seq:
            return _fail(v, expect_seq, f"row {expect_seq} is missing (next stored row is {seq})")
        if prev_hash != prev:
            return _fail(v, seq, f"row {seq}: prev_hash does not match the hash of row {seq - 1}")
        if audit.row_hash(audit.row_bytes(seq, ts, principal, source, action, obj, outcome, reason, detail,
                                          prev_hash)) != h:
            return _fail(v, seq, f"row {seq}: its content does not match its hash (the row was edited)")
        if checkpoint and seq == checkpoint.size:
            cp_hash = h
        prev, expect_seq = h, seq + 1
        v.rows += 1
    v.size, v.head = expect_seq - 1, prev
    if checkpoint:
        v.checkpoint = {"size": checkpoint.size, "head": checkpoint.head, "time": checkpoint.time}
        if checkpoint.size > v.size:
            return _fail(v, v.size + 1, f"the log has {v.size} rows but the checkpoint of {checkpoint.time} "
                                        f"vouches for {checkpoint.size}: rows were removed (truncated history)")
        if checkpoint.size < v.first_seq - 1:
            return _fail(v, None, f"the checkpoint (size {checkpoint.size}) predates the retention cut at row "
                                  f"{v.first_seq - 1}; it cannot be checked against this log")
        if checkpoint.size == v.first_seq - 1:
            cp_hash = audit.GENESIS if checkpoint.size == 0 else str(anchor[1]) if anchor else None
        if cp_hash != checkpoint.head:
            return _fail(v, checkpoint.size, f"row {checkpoint.size} differs from the checkpoint of "
                                             f"{checkpoint.time}: history was rewritten")
    return v


def current_checkpoint(conn: sqlite3.Connection, key: Ed25519PrivateKey) -> Checkpoint:
    """A fresh signed checkpoint of the log as it is now."""
    size, h = audit.head(conn)
    return sign(key, size, h)


def prune(conn: sqlite3.Connection, key: Ed25519PrivateKey, before: str, who: str = "retention") -> int:
    """Delete rows older than `before` (ISO time) after a verified chain, leaving a signed checkpoint at
    the cut so the rest stays verifiable; return rows removed. The last row is never pruned."""
    size = audit.head(conn)[0]
    last = conn.execute("SELECT max(seq) FROM audit_chain WHERE ts < ? AND seq < ?", [before, size]).fetchone()[0]
    if last is None:
        return 0
    v = verify(conn, key.public_key())
    if not v.ok:
        raise BadRequest(f"audit log does not verify ({v.problem}); not pruning", code="audit_broken")
    row = conn.execute("SELECT hash FROM audit_chain WHERE seq = ?", [last]).fetchone()
    cp = sign(key, int(last), str(row[0]))
    with audit.transaction(conn):
        conn.execute("INSERT INTO audit_anchor (size, head, ts, checkpoint) VALUES (?,?,?,?)",
                     [cp.size, cp.head, cp.time, cp.text()])
        removed = conn.execute("DELETE FROM audit_chain WHERE seq <= ?", [last]).rowcount
        audit.append(conn, audit.Event("audit.pruned", principal=who, outcome="ok", object=f"rows<={last}",
                                       detail={"before": before, "rows": removed, "cut_head": cp.head}))
    return int(removed)


def export(conn: sqlite3.Connection, key: Ed25519PrivateKey, since: str, out: Path, who: str) -> dict[str, Any]:
    """Write rows with ts >= since to OUT: audit.jsonl (each line the exact hashed bytes of one row),
    hashes.txt (seq and hash), checkpoint.txt (fresh, signed) and the device public key."""
    out.mkdir(parents=True, exist_ok=True)
    audit.append(conn, audit.Event("audit.export", principal=who, object=str(out), detail={"since": since}))
    first = conn.execute("SELECT min(seq) FROM audit_chain WHERE ts >= ?", [since]).fetchone()[0]
    n = 0
    with (out / "audit.jsonl").open("wb") as rows, (out / "hashes.txt").open("w") as hashes:
        if first is not None:
            for r in audit.iter_rows(conn, after_seq=int(first) - 1):
                rows.write(audit.row_bytes(*r[:10]) + b"\n")
                hashes.write(f"{r[0]} {r[10]}\n")
                n += 1
        rows.flush()
        os.fsync(rows.fileno())
    cp = current_checkpoint(conn, key)
    (out / "checkpoint.txt").write_text(cp.text())
    (out / "device-key.pub.pem").write_bytes(public_pem(key.public_key()))
    return {"rows": n, "first_seq": first, "checkpoint": json.loads(json.dumps(
        {"size": cp.size, "head": cp.head, "time": cp.time})), "out": str(out)}
