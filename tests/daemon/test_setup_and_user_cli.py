"""The one-time setup code, and `atoll user` on the box while the daemon runs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from daemon import setup_code
from tests.daemon.conftest import PASSWORD, SecApp, atoll

BODY = {"username": "ward-admin", "password": PASSWORD}


async def test_setup_code_is_single_use(sec_app: Any) -> None:
    a: SecApp = await sec_app()
    code = setup_code.create(a.settings.state_dir, 60)
    path = a.settings.state_dir / setup_code.FILE
    assert path.stat().st_mode & 0o777 == 0o600
    before = a.snapshot()
    for wrong in ("AAAA-AAAA-AAAA", "", code + "X"):
        r = await a.client.post("/auth/setup", json={**BODY, "code": wrong})
        assert r.status in (400, 401), wrong
        assert {k: v for k, v in a.snapshot().items() if k != "audit_chain"} == \
               {k: v for k, v in before.items() if k != "audit_chain"}
    r = await a.client.post("/auth/setup", json={**BODY, "code": code.lower()})
    assert r.status == 201 and not path.exists()
    after = a.snapshot()
    r = await a.client.post("/auth/setup", json={**BODY, "username": "second", "code": code})
    assert r.status == 401 and (await r.json())["error"]["code"] == "setup_code_invalid"
    assert a.rows("SELECT username, role FROM users") == [("ward-admin", "admin")]
    assert {k: v for k, v in a.snapshot().items() if k != "audit_chain"} == \
           {k: v for k, v in after.items() if k != "audit_chain"}
    assert [x[2] for x in a.audit() if x[2].startswith("setup")] == ["setup.refused"] * 2 + ["setup.used",
                                                                                            "setup.refused"]
    # even a fresh code is refused once an account exists
    late = setup_code.create(a.settings.state_dir, 60)
    r = await a.client.post("/auth/setup", json={**BODY, "username": "third", "code": late})
    assert r.status == 401 and a.rows("SELECT count(*) FROM users") == [(1,)]


async def test_expired_setup_code_is_refused(sec_app: Any) -> None:
    a: SecApp = await sec_app()
    code = setup_code.create(a.settings.state_dir, 60)
    path = a.settings.state_dir / setup_code.FILE
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "expires": time.time() - 1}))  # an hour has passed
    before = a.snapshot()
    r = await a.client.post("/auth/setup", json={**BODY, "code": code})
    assert r.status == 401 and (await r.json())["error"]["code"] == "setup_code_expired"
    assert a.snapshot()["users"] == before["users"] == []
    r = await a.client.post("/auth/setup", json={**BODY, "password": "short", "code": code})
    assert r.status == 400 and (await r.json())["error"]["param"] == "password"


async def test_user_cli_works_while_the_daemon_runs(sec_app: Any) -> None:
    a: SecApp = await sec_app()
    state: Path = a.settings.state_dir
    r = atoll("user", "create", "nurse", "--role", "user", "--password-stdin", "--state-dir", state,
              input_text=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    headers = await a.login("nurse")
    assert (await a.client.get("/auth/me")).status == 200
    r = atoll("user", "list", "--json", "--state-dir", state)
    assert [u["username"] for u in json.loads(r.stdout)] == ["nurse"]
    r = atoll("user", "passwd", "nurse", "--password-stdin", "--state-dir", state, input_text="short\n")
    assert r.returncode == 1 and "at least 12 characters" in r.stderr and "Traceback" not in r.stderr
    assert (await a.client.get("/auth/me")).status == 200  # the refused change changed nothing
    r = atoll("user", "disable", "nurse", "--state-dir", state)
    assert r.returncode == 0
    out = await a.client.post("/auth/logout", headers=headers)
    assert out.status == 401 and (await out.json())["error"]["code"] == "session_revoked"
    assert atoll("user", "enable", "nurse", "--state-dir", state).returncode == 0
    r = atoll("user", "passwd", "nurse", "--password-stdin", "--state-dir", state, input_text="x" * 20 + "\n")
    assert r.returncode == 0
    assert (await a.client.post("/auth/login", json={"username": "nurse", "password": "x" * 20})).status == 200
    r = atoll("user", "delete", "ghost", "--state-dir", state)
    assert r.returncode == 1 and "no user named 'ghost'" in r.stderr
    assert atoll("user", "delete", "nurse", "--state-dir", state).returncode == 0
    assert (await a.client.get("/auth/me")).status == 401
    principals = {x[0] for x in a.audit() if x[2].startswith("user.")}
    assert all(p.startswith("local:") or p == "test" for p in principals), principals


async def test_user_made_on_the_box_before_the_daemon_starts(sec_app: Any, tmp_path: Path) -> None:
    state = tmp_path / "fresh"
    r = atoll("user", "create", "boss", "--role", "admin", "--password-stdin", "--state-dir", state,
              input_text=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    r = atoll("user", "create", "boss", "--role", "admin", "--password-stdin", "--state-dir", state,
              input_text=PASSWORD + "\n")
    assert r.returncode == 1 and "already exists" in r.stderr
    a: SecApp = await sec_app(state_dir=state)
    assert not setup_code.needed(a.conn)  # no setup code on a box that has an account
    headers = await a.login("boss")
    r2 = await a.client.get("/admin/users")
    assert r2.status == 200 and [u["username"] for u in (await r2.json())["data"]] == ["boss"]
    assert headers["X-CSRF-Token"]
