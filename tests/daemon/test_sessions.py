"""Login, sessions, CSRF and login throttling through the real app and real HTTP."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from daemon import accounts
from daemon.db import now_iso
from daemon.sessions import COOKIE
from tests.daemon.conftest import PASSWORD, SecApp

WRONG = "not the password at all"


def people(a: SecApp) -> dict[str, list[tuple[Any, ...]]]:
    """Users, sessions and tokens: what a refused request must leave as it was."""
    snap = a.snapshot()
    return {k: snap[k] for k in ("users", "sessions", "tokens")}


async def test_login_me_logout_and_cookie_flags(sec_app: Any) -> None:
    a: SecApp = await sec_app()
    a.add_user("nurse")
    r = await a.client.post("/auth/login", json={"username": "nurse", "password": PASSWORD})
    assert r.status == 200
    body = await r.json()
    assert body["role"] == "user" and body["idle_timeout_seconds"] == 1800
    assert body["absolute_timeout_seconds"] == 12 * 3600
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Path=/" in cookie and "Secure" not in cookie  # plain HTTP here; Secure with TLS (test_tls)
    secret = r.cookies[COOKIE].value
    # stored hashed only
    assert a.rows("SELECT count(*) FROM sessions WHERE id_hash = ?", (secret,)) == [(0,)]
    me = await (await a.client.get("/auth/me")).json()
    assert me == {"username": "nurse", "role": "user", "kind": "session", "csrf_token": body["csrf_token"]}
    r = await a.client.post("/auth/logout", headers={"X-CSRF-Token": body["csrf_token"], "Origin": a.origin})
    assert r.status == 200 and (await r.json()) == {"ended": True}
    assert [x[2] for x in a.audit() if x[2].startswith(("login", "session"))] == ["login.ok", "session.logout"]
    # the cookie replayed after logout
    r = await a.client.get("/auth/me", cookies={COOKIE: secret})
    assert r.status == 401 and (await r.json())["error"]["code"] == "session_revoked"


async def test_wrong_password_and_unknown_user_look_the_same(sec_app: Any) -> None:
    a: SecApp = await sec_app()
    a.add_user("nurse")
    before = people(a)
    answers, times = {}, {"wrong": [], "unknown": []}  # type: ignore[var-annotated]
    for i in range(4):  # 4 misses each: below the lockout, and back-off is off in this fixture
        for kind, name in (("wrong", "nurse"), ("unknown", f"ghost{i % 1}")):
            t = time.perf_counter()
            r = await a.client.post("/auth/login", json={"username": name, "password": WRONG})
            times[kind].append(time.perf_counter() - t)
            answers[kind] = (r.status, await r.json(), r.headers.get("Set-Cookie"))
    assert answers["wrong"] == answers["unknown"]
    assert answers["wrong"][0] == 401 and answers["wrong"][1]["error"]["code"] == "invalid_credentials"
    ratio = statistics.median(times["wrong"]) / statistics.median(times["unknown"])
    assert 0.5 < ratio < 2.0, times  # both pay one scrypt; the difference is noise
    assert people(a)["sessions"] == before["sessions"] == []
    assert a.rows("SELECT failures FROM users WHERE username='nurse'") == [(4,)]
    assert [x[5] for x in a.audit("login.failed")] == ["wrong_password", "unknown_user"] * 4


async def test_sixth_wrong_password_locks_and_is_audited(sec_app: Any) -> None:
    a: SecApp = await sec_app(lockout_minutes=1)
    a.add_user("eng")
    for _ in range(5):
        r = await a.client.post("/auth/login", json={"username": "eng", "password": WRONG})
        assert r.status == 401
    r = await a.client.post("/auth/login", json={"username": "eng", "password": WRONG})
    assert r.status == 429 and (await r.json())["error"]["code"] == "account_locked"
    assert int(r.headers["Retry-After"]) == 60
    assert a.audit("login.locked") == [("eng", "127.0.0.1", "login.locked", "user:eng", "locked", "wrong_password")]
    before = people(a)
    # even the right password is refused while locked, without a session
    r = await a.client.post("/auth/login", json={"username": "eng", "password": PASSWORD})
    assert r.status == 429 and (await r.json())["error"]["code"] == "account_locked"
    assert people(a) == before
    # an unknown name locks the same way (the answer cannot tell them apart)
    for _ in range(5):
        await a.client.post("/auth/login", json={"username": "nobody", "password": WRONG})
    r = await a.client.post("/auth/login", json={"username": "nobody", "password": WRONG})
    assert r.status == 429 and (await r.json())["error"]["code"] == "account_locked"
    # the admin clears it: `atoll user enable` does this
    accounts.set_disabled(a.conn, "eng", False, accounts.Actor("admin"))
    assert (await a.client.post("/auth/login", json={"username": "eng", "password": PASSWORD})).status == 200


async def test_exponential_backoff_per_account_and_per_source(sec_app: Any) -> None:
    a: SecApp = await sec_app(login_backoff_seconds=1.0)
    a.add_user("eng")
    a.add_user("other")
    r = await a.client.post("/auth/login", json={"username": "eng", "password": WRONG})
    assert r.status == 401
    before = people(a)
    r = await a.client.post("/auth/login", json={"username": "eng", "password": PASSWORD})
    assert r.status == 429 and (await r.json())["error"]["code"] == "login_throttled"
    assert r.headers["Retry-After"] == "1"
    # the same source is held back on another account too
    r = await a.client.post("/auth/login", json={"username": "other", "password": PASSWORD})
    assert r.status == 429
    assert people(a) == before  # refused tries are not checked and not counted
    await asyncio.sleep(1.05)
    r = await a.client.post("/auth/login", json={"username": "eng", "password": WRONG})
    assert r.status == 401  # the second miss in a row: now 2 s
    await asyncio.sleep(1.05)
    r = await a.client.post("/auth/login", json={"username": "eng", "password": PASSWORD})
    assert r.status == 429 and r.headers["Retry-After"] == "1"
    await asyncio.sleep(1.0)
    assert (await a.client.post("/auth/login", json={"username": "eng", "password": PASSWORD})).status == 200


async def test_csrf_and_origin_on_cookie_state_changes(sec_app: Any) -> None:
    a: SecApp = await sec_app()
    a.add_user("boss", "admin")
    good = await a.login("boss")
    before = people(a)
    body = {"username": "newbie", "password": PASSWORD, "role": "user"}
    cases = {
        "no csrf": {"Origin": a.origin},
        "wrong csrf": {"Origin": a.origin, "X-CSRF-Token": "0" * 64},
        "cross origin": {**good, "Origin": "http://evil.example"},
        "cross site fetch": {"X-CSRF-Token": good["X-CSRF-Token"], "Sec-Fetch-Site": "cross-site"},
        "no origin at all": {"X-CSRF-Token": good["X-CSRF-Token"]},
    }
    for why, headers in cases.items():
        r = await a.client.post("/admin/users", json=body, headers=headers)
        assert r.status == 403, why
        code = (await r.json())["error"]["code"]
        assert code == ("csrf_failed" if "csrf" in why else "cross_origin"), why
        assert people(a) == before, why
    r = await a.client.post("/admin/users", json=body, headers=good)
    assert r.status == 201
    # reads need no CSRF token; bearer requests need none either
    assert (await a.client.get("/admin/users")).status == 200
    a.client.session.cookie_jar.clear()
    r = await a.client.post("/admin/users", json={**body, "username": "bot2"}, headers=a.token("ops", "admin"))
    assert r.status == 201


async def test_expired_revoked_and_malformed_sessions(sec_app: Any) -> None:
    a: SecApp = await sec_app()
    a.add_user("nurse")
    await a.login("nurse")
    # idle: the clock moves 31 minutes (the stored times move back instead)
    a.conn.execute("UPDATE sessions SET last_seen = last_seen - 31 * 60")
    r = await a.client.get("/auth/me")
    assert r.status == 401 and (await r.json())["error"]["code"] == "session_expired"
    assert a.audit("session.expired")[0][5] == "idle"
    await a.login("nurse")
    a.conn.execute("UPDATE sessions SET created = created - 12 * 3600 - 1, last_seen = ? WHERE ended IS NULL",
                   (time.time(),))
    r = await a.client.get("/auth/me")
    assert r.status == 401 and (await r.json())["error"]["code"] == "session_expired"
    assert a.audit("session.expired")[1][5] == "absolute"
    # disabling the user (CLI or API) ends the session at once
    await a.login("nurse")
    assert (await a.client.get("/auth/me")).status == 200
    accounts.set_disabled(a.conn, "nurse", True, accounts.Actor("local:root", "console"))
    r = await a.client.get("/auth/me")
    assert r.status == 401 and (await r.json())["error"]["code"] == "session_revoked"
    before = people(a)
    for bad in ("x", "a" * 43 + "!", "é" * 43, "a" * 4000):
        r = await a.client.get("/auth/me", cookies={COOKIE: bad})
        assert r.status == 401, bad
        assert (await r.json())["error"]["code"] == "invalid_session"
    assert people(a) == before


async def test_overlong_credentials_are_refused_before_hashing(sec_app: Any) -> None:
    a: SecApp = await sec_app()
    a.add_user("nurse")
    before = a.snapshot()
    t = time.perf_counter()
    r = await a.client.post("/auth/login", json={"username": "nurse", "password": "p" * 3_000_000})
    assert r.status == 400 and (await r.json())["error"]["param"] == "password"
    r = await a.client.post("/auth/login", json={"username": "u" * 65, "password": PASSWORD})
    assert r.status == 400 and (await r.json())["error"]["param"] == "username"
    assert time.perf_counter() - t < 2.0
    r = await a.client.post("/auth/login", data=b'{"username":"nurse","password":"' + b"p" * 10_000_000 + b'"}',
                            headers={"Content-Type": "application/json"})
    assert r.status == 413
    r = await a.client.post("/auth/login")
    assert r.status == 401 and (await r.json())["error"]["code"] == "missing_credentials"
    assert a.snapshot() == before


async def test_people_change_their_own_password(sec_app: Any) -> None:
    a: SecApp = await sec_app()
    a.add_user("nurse")
    headers = await a.login("nurse")
    before = people(a)
    for body, status, code in (({"current_password": WRONG, "new_password": "x" * 20}, 401, "invalid_credentials"),
                               ({"current_password": PASSWORD, "new_password": "short"}, 400, "password_too_short"),
                               ({"current_password": PASSWORD}, 400, "invalid_value")):
        r = await a.client.post("/auth/password", json=body, headers=headers)
        assert r.status == status and (await r.json())["error"]["code"] == code, body
    after = people(a)
    assert after["sessions"] == before["sessions"] and after["users"][0][2] == before["users"][0][2]  # same hash
    r = await a.client.post("/auth/password", json={"current_password": PASSWORD, "new_password": "y" * 20},
                            headers=headers)
    assert r.status == 200
    assert (await a.client.get("/auth/me")).status == 401  # every session of the user ended
    assert (await a.client.post("/auth/login", json={"username": "nurse", "password": PASSWORD})).status == 401
    assert (await a.client.post("/auth/login", json={"username": "nurse", "password": "y" * 20})).status == 200
    r = await a.client.post("/auth/password", json={"current_password": "y" * 20, "new_password": "z" * 20},
                            headers=a.token("bot", "user"))
    assert r.status == 400 and (await r.json())["error"]["code"] == "not_a_session"


async def test_concurrent_wrong_passwords_still_lock_on_the_sixth(sec_app: Any) -> None:
    a: SecApp = await sec_app()
    a.add_user("eng")
    rs = await asyncio.gather(*(a.client.post("/auth/login", json={"username": "eng", "password": WRONG})
                                for _ in range(8)))
    assert sorted(r.status for r in rs) == [401] * 5 + [429] * 3
    assert a.rows("SELECT failures, locked_until IS NOT NULL FROM users") == [(8, 1)]
    r = await a.client.post("/auth/login", json={"username": "eng", "password": PASSWORD})
    assert r.status == 429 and (await r.json())["error"]["code"] == "account_locked"
    assert a.rows("SELECT count(*) FROM sessions") == [(0,)]


async def test_own_usage_shows_only_the_callers_rows(sec_app: Any) -> None:
    a: SecApp = await sec_app()
    a.conn.executemany("INSERT INTO usage (ts, principal, endpoint, model, prompt_tokens, completion_tokens) "
                       "VALUES (?, ?, 'chat', 'smollm2', 3, 4)", [(now_iso(), "mes"), (now_iso(), "pacs")])
    h = a.token("mes", "user")
    rows = (await (await a.client.get("/auth/usage", headers=h)).json())["data"]
    assert len(rows) == 1 and rows[0]["prompt_tokens"] == 3 and "principal" not in rows[0]
    r = await a.client.get("/auth/usage", headers=h, params={"limit": "many"})
    assert r.status == 400 and (await r.json())["error"]["param"] == "limit"


async def test_a_hash_with_older_parameters_is_renewed_at_login(sec_app: Any) -> None:
    a: SecApp = await sec_app()
    old = accounts.hash_password(PASSWORD, n=2**12, r=8, p=1)
    accounts.create_user(a.conn, "veteran", old, "user", accounts.Actor("test"))
    await a.login("veteran")
    [(stored,)] = a.rows("SELECT pw_hash FROM users")
    assert stored.startswith(accounts.CURRENT_PREFIX) and accounts.verify_password(PASSWORD, stored)
