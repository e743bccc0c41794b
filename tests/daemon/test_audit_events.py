"""Events from other parts land in the chain: governor, policy changes (sessions, retention), the admin API."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from daemon import audit, audit_verify
from hardware.governor import GovernorThresholds
from sync.errors import BundleRejected
from sync.policy import EXAMPLE_POLICY, parse_policy
from tests.daemon.conftest import PASSWORD, SecApp

GiB = 1 << 30


async def test_governor_critical_and_recovery_are_audited(sec_app: Any, tmp_path: Path) -> None:
    points = [(0, 50), (0.5, 95), (2, 60)]
    replay = tmp_path / "t.jsonl"
    replay.write_text("".join(json.dumps({"t": t, "ram_total_bytes": 16 * GiB, "ram_available_bytes": 10 * GiB,
                                          "cpu_temp_c": c}) + "\n" for t, c in points))
    a: SecApp = await sec_app(sensor_replay=str(replay), governor_interval=0.1,
                              governor=GovernorThresholds(min_dwell_s=0.3))
    async with asyncio.timeout(30):
        while not a.audit("governor.recovered"):
            await asyncio.sleep(0.1)
    [crit] = a.audit("governor.critical")
    assert crit[0] == "governor" and "95" in crit[5]
    assert audit_verify.verify(a.conn, a.services.security.key.public_key()).ok


async def test_policy_sets_session_lifetimes_and_audit_retention(sec_app: Any) -> None:
    a: SecApp = await sec_app()
    a.add_user("nurse")
    base = parse_policy(EXAMPLE_POLICY.read_bytes())
    text = EXAMPLE_POLICY.read_text() + "\n[sessions]\nidle_minutes = 5\nabsolute_hours = 1\n\n[audit]\n" \
                                         "retention_days = 30\n"
    policy = parse_policy(text.encode())
    assert (policy.session_idle_minutes, policy.session_absolute_hours, policy.audit_retention_days) == (5, 1, 30)
    a.services.updates.applier.enforcer.apply(base)
    a.services.updates.applier.enforcer.apply(policy)
    await a.services.background.drain()
    changes = a.audit("policy.changed")
    assert len(changes) == 2
    r = await a.client.post("/auth/login", json={"username": "nurse", "password": PASSWORD})
    body = await r.json()
    assert (body["idle_timeout_seconds"], body["absolute_timeout_seconds"]) == (300, 3600)
    a.conn.execute("UPDATE sessions SET last_seen = last_seen - 301")
    assert (await a.client.get("/auth/me")).status == 401
    # retention: rows older than 30 days go, behind a signed cut; the rest still verifies
    conn = a.conn
    conn.execute("DELETE FROM audit_chain")
    for i in range(5):
        audit._insert(conn, audit.Event("old", principal=f"p{i}"), ts=f"2020-01-0{i + 1}T00:00:00.000Z")
    audit.append(conn, audit.Event("recent"))
    assert await a.services.security.retain(a.services.db, a.services.limits.audit_retention_days) == 5
    v = audit_verify.verify(conn, a.services.security.key.public_key())
    assert v.ok and v.first_seq == 6 and [r[2] for r in a.audit()] == ["recent", "audit.pruned"]


async def test_bad_policy_tables_are_refused_naming_the_key() -> None:
    base = EXAMPLE_POLICY.read_text()
    for extra, words in (("[sessions]\nidle_minutes = 0\nabsolute_hours = 1\n", "sessions.idle_minutes"),
                         ("[sessions]\nidle_minutes = 5\n", "absolute_hours"),
                         ("[audit]\nretention_days = 3\n", "audit.retention_days"),
                         ("[audit]\nretention_days = true\n", "audit.retention_days")):
        with pytest.raises(BundleRejected) as e:
            parse_policy((base + "\n" + extra).encode())
        assert words in e.value.message and e.value.code == "bad_policy", (extra, e.value.message)
    assert dataclasses.asdict(parse_policy(base.encode()))["audit_retention_days"] is None


async def test_audit_api_filters_pages_and_verifies(sec_app: Any) -> None:
    a: SecApp = await sec_app()
    a.add_user("nurse")
    for _ in range(3):
        await a.client.post("/auth/login", json={"username": "nurse", "password": "wrong wrong wrong"})
    await a.client.post("/auth/login", json={"username": "nurse", "password": PASSWORD})
    a.client.session.cookie_jar.clear()
    h = a.token("officer", "auditor")
    r = await a.client.get("/admin/audit", headers=h, params={"action": "login.failed", "principal": "nurse",
                                                              "outcome": "failed", "limit": "2"})
    page = await r.json()
    assert r.status == 200 and [x["action"] for x in page["data"]] == ["login.failed"] * 2
    assert page["data"][0]["seq"] > page["data"][1]["seq"] and page["data"][0]["source"] == "127.0.0.1"
    r = await a.client.get("/admin/audit", headers=h, params={"action": "login.failed", "limit": "2",
                                                              "before": str(page["next_before"])})
    rest = await r.json()
    assert len(rest["data"]) == 1 and rest["next_before"] is None
    newest = page["data"][0]["ts"]
    r = await a.client.get("/admin/audit", headers=h, params={"since": newest, "until": "2999-01-01T00:00:00Z"})
    assert {x["action"] for x in (await r.json())["data"]} >= {"login.ok"}
    before = a.snapshot()
    for params, param in (({"since": "yesterday"}, "since"), ({"limit": "0"}, "limit"), ({"before": "x"}, "before"),
                          ({"colour": "red"}, "colour")):
        r = await a.client.get("/admin/audit", headers=h, params=params)
        assert r.status == 400 and (await r.json())["error"]["param"] == param, params
    assert a.snapshot() == before
    r = await a.client.get("/admin/audit/verify", headers=h)
    v = await r.json()
    assert r.status == 200 and v["ok"] and v["checkpoint"].startswith("atoll audit checkpoint v1\n")
    a.conn.execute("UPDATE audit_chain SET principal = 'someone' WHERE action = 'login.ok'")
    v = await (await a.client.get("/admin/audit/verify", headers=h)).json()
    assert not v["ok"] and "edited" in v["problem"]
