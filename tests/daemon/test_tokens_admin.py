"""API tokens through the admin API: shown once, expiry, rate limit, daily quota; users through the admin API."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from daemon.db import now_iso
from tests.daemon.conftest import PASSWORD, SecApp, atoll


async def test_token_create_list_revoke_through_the_admin_api(sec_app: Any) -> None:
    a: SecApp = await sec_app()
    admin = a.token("boss", "admin")
    r = await a.client.post("/admin/tokens", headers=admin, json={"name": "mes", "role": "user",
                                                                  "expires_in_days": 30, "rate_per_minute": 5,
                                                                  "daily_token_quota": 1000})
    assert r.status == 201
    made = await r.json()
    token = made["token"]
    assert made["expires"].endswith("Z") and made["rate_per_minute"] == 5
    listed = (await (await a.client.get("/admin/tokens", headers=admin)).json())["data"]
    row = next(t for t in listed if t["name"] == "mes")
    assert row["daily_token_quota"] == 1000 and token not in str(listed)
    assert (await a.client.get("/auth/me", headers={"Authorization": f"Bearer {token}"})).status == 200
    r = await a.client.delete("/admin/tokens/mes", headers=admin)
    assert r.status == 200
    r = await a.client.get("/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert r.status == 401 and (await r.json())["error"]["code"] == "token_revoked"
    before = a.snapshot()
    for body, param in (({"name": "x", "role": "root"}, "role"), ({"name": "x", "role": "user", "rate_per_minute": 0},
                                                                  "rate_per_minute"),
                        ({"name": "x", "role": "user", "expires_in_days": 10**30}, "expires_in_days"),
                        ({"name": "bad name!", "role": "user"}, "name")):
        r = await a.client.post("/admin/tokens", headers=admin, json=body)
        assert r.status == 400 and (await r.json())["error"]["param"] == param, body
    r = await a.client.delete("/admin/tokens/nope", headers=admin)
    assert r.status == 400 and (await r.json())["error"]["code"] == "token_not_found"
    assert a.snapshot() == before


async def test_expired_token_is_refused_and_audited_once(sec_app: Any) -> None:
    a: SecApp = await sec_app()
    admin = a.token("boss", "admin")
    token = (await (await a.client.post("/admin/tokens", headers=admin, json={
        "name": "temp", "role": "user", "expires_in_days": 1})).json())["token"]
    a.conn.execute("UPDATE tokens SET expires = '2020-01-01T00:00:00.000Z' WHERE name = 'temp'")
    before = {k: v for k, v in a.snapshot().items() if k != "audit_chain"}
    for _ in range(3):
        r = await a.client.get("/v1/models", headers={"Authorization": f"Bearer {token}"})
        assert r.status == 401 and (await r.json())["error"]["code"] == "token_expired"
    assert {k: v for k, v in a.snapshot().items() if k != "audit_chain"} == before
    assert [x[2:5] for x in a.audit("token.expired")] == [("token.expired", "token:temp", "expired")]


async def test_rate_limit_and_daily_quota_answer_429_with_retry_after(sec_app: Any) -> None:
    a: SecApp = await sec_app()
    admin = a.token("boss", "admin")
    token = (await (await a.client.post("/admin/tokens", headers=admin, json={
        "name": "mes", "role": "user", "rate_per_minute": 3})).json())["token"]
    h = {"Authorization": f"Bearer {token}"}
    for _ in range(3):
        assert (await a.client.get("/v1/models", headers=h)).status == 200
    for _ in range(2):
        r = await a.client.get("/v1/models", headers=h)
        assert r.status == 429 and (await r.json())["error"]["code"] == "token_rate_limited"
        assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert len(a.audit("token.rate_limited")) == 1  # once a minute, not once a request
    quota = (await (await a.client.post("/admin/tokens", headers=admin, json={
        "name": "pacs", "role": "user", "daily_token_quota": 100})).json())["token"]
    hq = {"Authorization": f"Bearer {quota}"}
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
    r = await a.client.post("/v1/chat/completions", headers=hq, json=body)
    assert r.status == 404  # under quota: on to the model (this box serves none)
    a.conn.execute("INSERT INTO usage (ts, principal, endpoint, model, prompt_tokens, completion_tokens) "
                   "VALUES (?, 'pacs', 'chat', 'smollm2', 60, 40)", [now_iso()])
    before = {k: v for k, v in a.snapshot().items() if k != "audit_chain"}
    r = await a.client.post("/v1/chat/completions", headers=hq, json=body)
    assert r.status == 429 and (await r.json())["error"]["code"] == "token_quota_exceeded"
    assert 1 <= int(r.headers["Retry-After"]) <= 86400
    assert (await a.client.get("/v1/models", headers=hq)).status == 200  # the quota counts inference only
    assert {k: v for k, v in a.snapshot().items() if k != "audit_chain"} == before


async def test_users_through_the_admin_api(sec_app: Any) -> None:
    a: SecApp = await sec_app(password_min_length=14)
    admin = a.token("boss", "admin")
    r = await a.client.post("/admin/users", headers=admin, json={"username": "nurse", "password": "x" * 14,
                                                                 "role": "user"})
    assert r.status == 201
    before = a.snapshot()
    for body, param, code in (
            ({"username": "n2", "password": "x" * 13, "role": "user"}, "password", "password_too_short"),
            ({"username": "n2", "password": "x" * 257, "role": "user"}, "password", "invalid_value"),
            ({"username": "nurse", "password": "x" * 14, "role": "user"}, "username", "user_exists"),
            ({"username": "-x", "password": "x" * 14, "role": "user"}, "username", "invalid_value"),
            ({"username": "n2", "password": "x" * 14, "role": "root"}, "role", "invalid_value")):
        r = await a.client.post("/admin/users", headers=admin, json=body)
        err = (await r.json())["error"]
        assert r.status == 400 and (err["param"], err["code"]) == (param, code), (body, err)
    r = await a.client.patch("/admin/users/ghost", headers=admin, json={"disabled": True})
    assert r.status == 404 and (await r.json())["error"]["code"] == "user_not_found"
    assert a.snapshot() == before
    await a.login("nurse", "x" * 14)
    a.client.session.cookie_jar.clear()
    r = await a.client.patch("/admin/users/nurse", headers=admin, json={"role": "auditor", "password": PASSWORD})
    assert r.status == 200 and (await r.json())["role"] == "auditor"
    assert a.rows("SELECT end_reason FROM sessions") == [("password_changed",)]
    r = await a.client.patch("/admin/users/nurse", headers=admin, json={"disabled": True})
    assert (await r.json())["disabled"]
    r = await a.client.post("/auth/login", json={"username": "nurse", "password": PASSWORD})
    assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_credentials"
    assert (await a.client.delete("/admin/users/nurse", headers=admin)).status == 200
    actions = [x[2] for x in a.audit() if x[3] == "user:nurse"]
    assert actions == ["user.created", "login.ok", "user.changed", "session.revoked", "user.role_changed",
                       "user.disabled", "login.failed", "user.deleted"]
    assert all(x[0] == "local-admin" or x[0] in ("boss", "nurse") for x in a.audit() if x[3] == "user:nurse")


def test_token_limits_from_the_command_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    r = atoll("token", "create", "--role", "user", "--name", "mes", "--expires-days", "7", "--rate-per-minute", "60",
              "--daily-token-quota", "50000", "--state-dir", state)
    assert r.returncode == 0 and r.stdout.startswith("atoll_"), r.stderr
    for bad, word in ((("--expires-days", "0"), "expires_in_days"), (("--rate-per-minute", "0"), "rate_per_minute")):
        r = atoll("token", "create", "--role", "user", "--name", "other", *bad, "--state-dir", state)
        assert r.returncode == 1 and word in r.stderr and "Traceback" not in r.stderr
    with sqlite3.connect(state / "atoll.db") as conn:
        rows = conn.execute("SELECT name, rate_per_minute, daily_token_quota, expires IS NOT NULL "
                            "FROM tokens").fetchall()
    assert rows == [("mes", 60, 50000, 1)]
