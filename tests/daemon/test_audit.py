"""The hash-chained audit log: tamper evidence, checkpoints, pruning, export, by hand and by the CLI."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from daemon import audit, audit_verify, device_key
from daemon.db import StateDB
from tests.daemon.conftest import atoll


def fill(db: StateDB, n: int) -> None:
    """n events of several kinds, some with awkward text."""
    for i in range(n):
        db.audit(f"user{i % 3}", "login.failed" if i % 2 else "login.ok", "failed" if i % 2 else "ok",
                 note="tab\there, quote \" and é, line\u2028sep", n=i, big=2**60, ratio=0.5)


@pytest.fixture
def logged(tmp_path: Path) -> tuple[Path, StateDB, Any]:
    """A state dir with a device key and 20 audit rows."""
    state = tmp_path / "state"
    db = StateDB(state / "atoll.db")
    key = device_key.ensure(state)
    fill(db, 20)
    return state, db, key


def test_device_key_is_private_and_stable(tmp_path: Path) -> None:
    key = device_key.ensure(tmp_path)
    assert (tmp_path / device_key.PRIVATE_NAME).stat().st_mode & 0o777 == 0o600
    assert device_key.key_id(device_key.ensure(tmp_path).public_key()) == device_key.key_id(key.public_key())
    assert device_key.key_id(device_key.load_public(tmp_path / device_key.PUBLIC_NAME)) == \
        device_key.key_id(key.public_key())


def test_chain_verifies_and_names_the_edited_row(logged: tuple[Path, StateDB, Any]) -> None:
    state, db, key = logged
    conn = db.db.conn
    assert audit_verify.verify(conn, key.public_key()).ok
    r = atoll("audit", "verify", "--state-dir", state)
    assert r.returncode == 0 and "rows 1..20 verified" in r.stdout, r.stderr
    for column, value in (("principal", "'someone else'"), ("detail", "'{}'"), ("outcome", "'refused'"),
                          ("ts", "'2020-01-01T00:00:00.000Z'")):
        original = conn.execute(f"SELECT {column} FROM audit_chain WHERE seq = 7").fetchone()[0]  # noqa: S608
        conn.execute(f"UPDATE audit_chain SET {column} = {value} WHERE seq = 7")  # noqa: S608
        v = audit_verify.verify(conn, key.public_key())
        assert (v.ok, v.broken_seq) == (False, 7), column
        r = atoll("audit", "verify", "--state-dir", state)
        assert r.returncode == 1 and "row 7" in r.stderr and "edited" in r.stderr, (column, r.stderr)
        conn.execute(f"UPDATE audit_chain SET {column} = ? WHERE seq = 7", [original])  # noqa: S608
    assert audit_verify.verify(conn, key.public_key()).ok
    # a row removed from the middle, and a whole chain recomputed after an edit
    conn.execute("DELETE FROM audit_chain WHERE seq = 12")
    v = audit_verify.verify(conn, key.public_key())
    assert (v.ok, v.broken_seq) == (False, 12) and "missing" in (v.problem or "")


def test_truncation_is_caught_only_with_a_checkpoint(logged: tuple[Path, StateDB, Any], tmp_path: Path) -> None:
    state, db, _ = logged
    cp_file = tmp_path / "cp.txt"
    r = atoll("audit", "checkpoint", "--state-dir", state)
    assert r.returncode == 0, r.stderr
    cp_file.write_text(r.stdout)
    fill(db, 3)  # the log goes on growing: the old checkpoint still holds
    r = atoll("audit", "verify", "--checkpoint", cp_file, "--state-dir", state)
    assert r.returncode == 0 and "still holds the checkpoint's 20 rows" in r.stdout, r.stderr
    db.db.conn.execute("DELETE FROM audit_chain WHERE seq > 18")  # the last rows deleted
    assert atoll("audit", "verify", "--state-dir", state).returncode == 0  # a bare chain cannot tell
    r = atoll("audit", "verify", "--checkpoint", cp_file, "--state-dir", state)
    assert r.returncode == 1 and "truncated" in r.stderr and "18 rows" in r.stderr, r.stderr


def test_rewritten_history_is_caught_by_a_checkpoint(logged: tuple[Path, StateDB, Any]) -> None:
    _, db, key = logged
    conn = db.db.conn
    cp = audit_verify.parse(audit_verify.current_checkpoint(conn, key).text(), key.public_key())
    # an attacker without the device key rewrites row 5 and recomputes every later hash
    rows = list(audit.iter_rows(conn))
    conn.execute("DELETE FROM audit_chain")
    prev = audit.GENESIS
    for r in rows:
        principal = "mallory" if r[0] == 5 else r[2]
        data = audit.row_bytes(r[0], r[1], principal, r[3], r[4], r[5], r[6], r[7], r[8], prev)
        h = audit.row_hash(data)
        conn.execute("INSERT INTO audit_chain VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                     [r[0], r[1], principal, *r[3:9], prev, h])
        prev = h
    assert audit_verify.verify(conn, key.public_key()).ok  # consistent chain ...
    v = audit_verify.verify(conn, key.public_key(), cp)  # ... but not the one the box signed
    assert not v.ok and "rewritten" in (v.problem or "")


def test_bad_checkpoints_are_refused(logged: tuple[Path, StateDB, Any], tmp_path: Path) -> None:
    state, db, key = logged
    text = audit_verify.current_checkpoint(db.db.conn, key).text()
    forged = text.replace("size 20", "size 2")
    other = device_key.ensure(tmp_path / "other")
    for bad, why in ((forged, "signature does not verify"), ("hello\n", "not an atoll audit checkpoint"),
                     (audit_verify.current_checkpoint(db.db.conn, other).text(), "signed by device")):
        f = tmp_path / "bad.txt"
        f.write_text(bad)
        r = atoll("audit", "verify", "--checkpoint", f, "--state-dir", state)
        assert r.returncode == 1 and why in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_pruning_keeps_the_chain_verifiable(logged: tuple[Path, StateDB, Any]) -> None:
    _, db, key = logged
    conn = db.db.conn
    old_cp = audit_verify.parse(audit_verify.current_checkpoint(conn, key).text(), key.public_key())
    conn.execute("UPDATE audit_chain SET ts = '2020-01-01T00:00:00.000Z' WHERE seq <= 10")
    # the timestamps were edited: pruning refuses a broken chain
    with pytest.raises(Exception, match="does not verify"):
        audit_verify.prune(conn, key, "2021-01-01T00:00:00.000Z")
    conn.execute("DELETE FROM audit_chain")
    conn.execute("DELETE FROM audit_anchor")
    for i in range(10):
        audit._insert(conn, audit.Event("old.event", principal=f"p{i}"), ts=f"2020-01-01T00:00:0{i}.000Z")
    fill(db, 5)
    cp = audit_verify.parse(audit_verify.current_checkpoint(conn, key).text(), key.public_key())
    assert audit_verify.prune(conn, key, "2021-01-01T00:00:00.000Z") == 10
    v = audit_verify.verify(conn, key.public_key(), cp)
    assert v.ok and v.first_seq == 11 and v.size == 16, v
    assert conn.execute("SELECT action FROM audit_chain ORDER BY seq DESC LIMIT 1").fetchone()[0] == "audit.pruned"
    assert old_cp.size == 20  # a checkpoint from before the cut cannot be checked any more: said so, not passed
    v = audit_verify.verify(conn, key.public_key(), audit_verify.parse(
        audit_verify.sign(key, 3, "a" * 64).text(), key.public_key()))
    assert not v.ok and "predates the retention cut" in (v.problem or "")
    # editing the signed cut is caught
    conn.execute("UPDATE audit_anchor SET head = ?", ["b" * 64])
    assert not audit_verify.verify(conn, key.public_key()).ok


def test_export_verifies_by_hand_with_sha256sum_and_openssl(logged: tuple[Path, StateDB, Any],
                                                             tmp_path: Path) -> None:
    state, db, _ = logged
    out = tmp_path / "stick"
    r = atoll("audit", "export", "--since", "2000-01-01T00:00:00Z", "--out", out, "--state-dir", state)
    assert r.returncode == 0 and "exported 21 rows" in r.stdout, r.stderr
    lines = (out / "audit.jsonl").read_bytes().splitlines()
    assert json.loads(lines[-1])["action"] == "audit.export"
    # each line's sha256sum is the next line's prev_hash; the last one is the checkpoint's head
    for line, nxt in itertools.pairwise(lines):
        digest = subprocess.run(["sha256sum"], input=line, capture_output=True, check=True).stdout.split()[0]
        assert json.loads(nxt)["prev_hash"] == digest.decode()
    body, sig = (out / "checkpoint.txt").read_text().split("\n\n")
    last = hashlib.sha256(lines[-1]).hexdigest()
    assert f"head {last}\n" in body and f"size {len(lines)}\n" in body
    (tmp_path / "body").write_text(body + "\n")
    (tmp_path / "sig").write_bytes(__import__("base64").b64decode(sig.split()[1]))
    ok = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", out / "device-key.pub.pem",
                         "-rawin", "-in", tmp_path / "body", "-sigfile", tmp_path / "sig"],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "Signature Verified Successfully" in ok.stdout, ok.stderr
    assert db.audit_log(1)[0]["action"] == "audit.export"
    assert os.stat(state / device_key.PRIVATE_NAME).st_mode & 0o777 == 0o600


def test_canonical_encoding_is_rfc8785_for_our_values() -> None:
    row = {"b": [1, True, None], "a": "é\u2028\x01\"\\/", "c": {"z": 1, "y": "x"}}
    assert audit.canonical(audit.normalize(row)) == '{"a":"é\u2028\\u0001\\"\\\\/","b":[1,true,null],' \
                                                    '"c":{"y":"x","z":1}}'
    assert audit.normalize({"f": 0.1, "i": 2**53, "s": "\ud800"}) == {"f": "0.1", "i": str(2**53), "s": "?"}


def test_old_plain_audit_rows_are_carried_into_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "atoll.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied TEXT)")
    conn.execute("INSERT INTO _migrations VALUES ('001_initial', 'x')")
    for t in ("CREATE TABLE tokens (id TEXT PRIMARY KEY, name TEXT, role TEXT, hash TEXT, created TEXT, "
              "revoked TEXT, last_used TEXT)",
              "CREATE TABLE usage (id INTEGER PRIMARY KEY, ts TEXT, principal TEXT, prompt_tokens INTEGER, "
              "completion_tokens INTEGER)",
              "CREATE TABLE audit (id INTEGER PRIMARY KEY, ts TEXT, actor TEXT, action TEXT, outcome TEXT, "
              "detail TEXT)"):
        conn.execute(t)
    conn.execute("INSERT INTO audit (ts, actor, action, outcome, detail) VALUES "
                 "('2025-01-01T00:00:00+00:00', 'local-admin', 'token.create', 'ok', '{\"name\": \"a\"}')")
    conn.commit()
    conn.close()
    db = StateDB(path)
    [row] = db.audit_log()
    assert (row["principal"], row["action"], row["detail"]) == ("local-admin", "token.create",
                                                                 {"name": "a", "legacy": True})
    assert audit_verify.verify(db.db.conn, device_key.ensure(tmp_path).public_key()).ok
