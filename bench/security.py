"""Costs of accounts and the audit log: login latency, audit write overhead per request, verify time.

    python -m bench.security [--logins 20] [--requests 400] [--rows 1000000]

1. Login: the real app served over real HTTP (aiohttp AppRunner on loopback, a real
   client), POST /auth/login with the right password, N times; p50/p90 in ms, next to the
   bare scrypt hash time with the same parameters.
2. Audit overhead: two routes added to the same real app for this bench, identical except
   that one appends one audit row (through the DB thread, as every audited handler does)
   and the other makes a no-op call on the DB thread. Requests alternate; the p50 difference
   is the latency an audit write adds to a request.
3. Verify: a fresh state DB with N rows in the chain; time of audit_verify.verify (what
   `atoll audit verify` runs) over all of them, and rows per second.

Figures are noisy on a shared box: compare the numbers of one run with each other.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from daemon import accounts, audit, audit_verify, device_key
from daemon.app import create_app
from daemon.auth import create_token
from daemon.config import Settings
from daemon.db import StateDB
from daemon.services import SERVICES, bootstrap

PASSWORD = "a long bench password"  # noqa: S105 - a throwaway account in a temp dir


def pct(xs: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of xs."""
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


async def _with_db(request: web.Request) -> web.Response:
    db = request.app[SERVICES].db
    await db.run(audit.append, db.db.conn, audit.Event("bench.event", principal="bench", source=request.remote,
                                                       object="bench", detail={"n": 1}))
    return web.json_response({"ok": True})


async def _without(request: web.Request) -> web.Response:
    db = request.app[SERVICES].db
    await db.run(lambda: None)
    return web.json_response({"ok": True})


async def http_figures(state: Path, logins: int, requests: int) -> dict[str, Any]:
    """Login latency and audit overhead through a real server and client."""
    settings = Settings(state_dir=state, usb_watch=False, login_backoff_seconds=0.0, host="127.0.0.1", port=0)
    services = bootstrap(settings)
    accounts.create_user(services.db.db.conn, "bench", accounts.hash_password(PASSWORD), "user",
                         accounts.Actor("bench"))
    token = create_token(services.db, "bench-admin", "admin")
    app = create_app(settings, services)
    app.router.add_get("/admin/bench-audited", _with_db)
    app.router.add_get("/admin/bench-plain", _without)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession() as http:
            times = []
            for _ in range(logins):
                t = time.perf_counter()
                async with http.post(f"{base}/auth/login", json={"username": "bench", "password": PASSWORD}) as r:
                    assert r.status == 200, await r.text()
                times.append((time.perf_counter() - t) * 1000)
            out["login_ms"] = times
            h = {"Authorization": f"Bearer {token}"}
            a: list[float] = []
            b: list[float] = []
            for i in range(requests * 2):
                path = "/admin/bench-audited" if i % 2 else "/admin/bench-plain"
                t = time.perf_counter()
                async with http.get(base + path, headers=h) as r:
                    assert r.status == 200
                (a if i % 2 else b).append((time.perf_counter() - t) * 1000)
            out["audited_ms"], out["plain_ms"] = a, b
    finally:
        await runner.cleanup()
    return out


def verify_figures(state: Path, rows: int) -> dict[str, float]:
    """Fill a chain with `rows` rows, then time a full verification."""
    db = StateDB(state / "atoll.db")
    key = device_key.ensure(state)
    conn = db.db.conn
    t = time.perf_counter()
    with audit.transaction(conn):
        for i in range(rows):
            audit._insert(conn, audit.Event("login.ok" if i % 3 else "login.failed", principal=f"user{i % 97}",
                                            source=f"10.0.{i % 250}.{i % 200}", object=f"user:user{i % 97}",
                                            outcome="ok" if i % 3 else "failed",
                                            reason=None if i % 3 else "wrong_password",
                                            detail={"failures_in_a_row": i % 6}))
    fill = time.perf_counter() - t
    t = time.perf_counter()
    v = audit_verify.verify(conn, key.public_key())
    took = time.perf_counter() - t
    assert v.ok and v.size >= rows, v
    return {"fill_s": fill, "verify_s": took, "rows": v.size}


def main() -> None:
    """Run the three measurements and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--logins", type=int, default=20)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    bare, cpu = [], []
    for _ in range(5):
        t, c = time.perf_counter(), time.thread_time()
        accounts.hash_password(PASSWORD)
        bare.append((time.perf_counter() - t) * 1000)
        cpu.append((time.thread_time() - c) * 1000)
    with tempfile.TemporaryDirectory() as d:
        h = asyncio.run(http_figures(Path(d) / "http", args.logins, args.requests))
        v = verify_figures(Path(d) / "verify", args.rows)
    n, r, p = accounts.SCRYPT_N, accounts.SCRYPT_R, accounts.SCRYPT_P
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"password hash: scrypt N=2^{n.bit_length() - 1} r={r} p={p} ({128 * n * r // 2**20} MiB), "
          f"bare hash p50 {statistics.median(bare):.0f} ms, min {min(bare):.0f} ms; CPU time p50 "
          f"{statistics.median(cpu):.0f} ms (what a login costs on an otherwise idle core)")
    lg = h["login_ms"]
    print(f"login over HTTP ({args.logins}x): p50 {pct(lg, 50):.0f} ms, p90 {pct(lg, 90):.0f} ms, min {min(lg):.0f} ms")
    pa, pp = pct(h["audited_ms"], 50), pct(h["plain_ms"], 50)
    print(f"request with one audit write ({args.requests}x each): p50 {pa:.2f} ms vs {pp:.2f} ms without; "
          f"added p50 {pa - pp:.2f} ms (p90 {pct(h['audited_ms'], 90):.2f} vs {pct(h['plain_ms'], 90):.2f} ms)")
    print(f"audit verify: {v['rows']} rows in {v['verify_s']:.1f} s ({v['rows'] / v['verify_s']:,.0f} rows/s); "
          f"writing them took {v['fill_s']:.1f} s")


if __name__ == "__main__":
    main()
