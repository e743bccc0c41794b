"""Slow, many and hostile clients against the daemon's real listener (GuardedSite + the runner
options `atoll serve` uses): stalled connections, read timeouts, connection caps, malformed
requests that must log one line each, auth throttling, usage retention and token last_used."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from daemon.app import create_app
from daemon.auth import create_token
from daemon.config import Settings
from daemon.db import StateDB
from daemon.edge import EDGE, GuardedSite, server_options
from daemon.services import SERVICES, bootstrap


class Served:
    """The real app behind the real listener on 127.0.0.1, with tokens."""

    def __init__(self, runner: web.AppRunner, port: int, settings: Settings, user: str, admin: str) -> None:
        self.runner, self.port, self.settings, self.user, self.admin = runner, port, settings, user, admin
        self.url = f"http://127.0.0.1:{port}"
        self.edge = runner.app[EDGE]

    async def get(self, path: str, token: str | None = None) -> tuple[int, Any, dict[str, str]]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with aiohttp.ClientSession() as s, s.get(self.url + path, headers=headers) as r:
            return r.status, await r.json(), dict(r.headers)


@pytest.fixture
async def serve(state_dir: Path) -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []

    async def start(**overrides: Any) -> Served:
        settings = Settings(state_dir=state_dir, threads=2, n_ctx=512, usb_watch=False, **overrides)
        services = bootstrap(settings)
        user = create_token(services.db, "tester", "user")
        admin = create_token(services.db, "boss", "admin")
        app = create_app(settings, services)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2,
                               **server_options(app))
        await runner.setup()
        runners.append(runner)
        site = GuardedSite(runner, "127.0.0.1", 0)
        await site.start()
        return Served(runner, site.port, settings, user, admin)

    yield start
    for r in runners:
        await r.cleanup()


STALLER = textwrap.dedent("""
    import socket, sys, time
    port, n, hold = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    socks, refused = [], 0
    for i in range(n):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\\r\\nHost: x\\r\\nContent-Le")  # and never more
        except OSError:
            refused += 1
            s.close()
            continue
        socks.append(s)
    print("connected", len(socks), "refused", refused, flush=True)
    time.sleep(hold)
    alive = 0
    for s in socks:
        s.setblocking(False)
        try:
            s.recv(4096)  # data (a 503) or b"" (closed): the daemon let go of it
        except BlockingIOError:
            alive += 1  # still open, nothing received
        except OSError:
            pass
    print("alive", alive, flush=True)
""")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_normal_requests_succeed_while_2000_stalled_connections_are_attempted(serve) -> None:
    srv = await serve(header_timeout=2.0, max_connections_per_ip=64, max_connections=256)
    fds_before = _fds()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", STALLER, str(srv.port), "2000", "4",
                                                stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
    assert line.startswith("connected"), line
    connected = int(line.split()[1])
    # while the stallers hold their sockets the daemon accepts (and refuses) the rest, and still serves
    guard = srv.edge.guard
    served: list[float] = []
    peak_fds, peak_open = 0, 0
    t_start = time.monotonic()
    async with asyncio.timeout(60):
        while guard.refused + guard.admitted < connected + len(served) or time.monotonic() - t_start < 1.0:
            t0 = time.perf_counter()
            status, body, _ = await srv.get("/v1/models", srv.user)
            served.append(time.perf_counter() - t0)
            assert status == 200 and body["data"][0]["id"] == "smollm2"
            peak_fds, peak_open = max(peak_fds, _fds()), max(peak_open, guard.total)
            await asyncio.sleep(0.05)
    assert (await srv.get("/healthz"))[0] == 200
    assert peak_open <= 64 + 1 and peak_fds - fds_before <= 64 + 16, (peak_open, peak_fds, fds_before)
    refused = guard.refused
    assert refused > 0
    # after header_timeout every stalled connection has been closed by the daemon
    alive = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    await proc.wait()
    assert alive.strip() == "alive 0", alive
    assert srv.edge.guard.total == 0
    stalled_admitted = guard.admitted - len(served) - 1
    print(f"\nstalled connections attempted 2000 ({connected} connected): at most {peak_open - 1} open at once "
          f"(per-address cap 64; {stalled_admitted} admitted in all as timeouts freed places), "
          f"refused {refused} with 503, all closed after header_timeout; daemon fds +{peak_fds - fds_before}; "
          f"{len(served)} normal requests answered 200 meanwhile (slowest {max(served) * 1000:.0f} ms)")


async def _raw(port: int, data: bytes, *, read: bool = True, close_after: float | None = None) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    await w.drain()
    if close_after is not None:
        await asyncio.sleep(close_after)
        w.close()
        return b""
    out = await asyncio.wait_for(r.read(), 30) if read else b""
    w.close()
    return out


async def test_partial_headers_slow_headers_and_stalled_bodies_are_closed(serve) -> None:
    srv = await serve(header_timeout=1.0, body_timeout=1.0)
    t0 = time.monotonic()
    assert await _raw(srv.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n") == b""  # closed, no answer
    assert 0.9 <= time.monotonic() - t0 < 10
    # a byte every 0.3 s never completes the headers: still closed at header_timeout
    r, w = await asyncio.open_connection("127.0.0.1", srv.port)
    t0 = time.monotonic()
    closed_at = None
    for b in b"GET /healthz HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa":
        try:
            w.write(bytes([b]))
            await w.drain()
        except ConnectionError:
            closed_at = time.monotonic() - t0
            break
        await asyncio.sleep(0.3)
        if r.at_eof() or w.is_closing():
            closed_at = time.monotonic() - t0
            break
        try:
            if await asyncio.wait_for(r.read(1), 0.01) == b"":
                closed_at = time.monotonic() - t0
                break
        except TimeoutError:
            pass
    w.close()
    assert closed_at is not None and closed_at < 5, closed_at
    # headers complete, body stalls: closed after body_timeout
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {srv.user}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"").encode()
    t0 = time.monotonic()
    await _raw(srv.port, head)
    assert time.monotonic() - t0 < 10
    assert srv.edge.guard.total == 0
    # a normal keep-alive client is unaffected
    assert (await srv.get("/healthz"))[0] == 200


async def test_malformed_requests_log_one_line_each_rate_limited(serve, caplog) -> None:
    srv = await serve()
    caplog.set_level(logging.INFO)
    bad = [b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n",
           b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n0\r\n\r\n"]
    for i in range(300):
        out = await _raw(srv.port, bad[i % 2])
        assert out.split(b" ", 2)[1] == b"400", out[:80]
        head, _, payload = out.partition(b"\r\n\r\n")
        assert b"application/json" in head and json.loads(payload)["error"]["code"] == "malformed_request"
    # clients that leave mid-body
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {srv.user}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": ").encode()
    for _ in range(100):
        await _raw(srv.port, head, close_after=0.0)
    await asyncio.sleep(0.5)
    records = [r for r in caplog.records if r.name.startswith(("aiohttp", "daemon"))]
    assert not any(r.exc_info for r in records)
    text = "\n".join(r.getMessage() for r in records)
    assert "Traceback" not in text and "\n  File " not in text
    assert len(records) <= 20, text  # 400 events: at most 5 lines per kind per 10 s
    assert (await srv.get("/healthz"))[0] == 200
    print(f"\n400 malformed/abandoned requests -> {len(records)} log lines:\n{text}")


async def test_failed_authentication_is_throttled_per_address_and_audited(serve) -> None:
    srv = await serve(auth_failures_allowed=5, auth_window=2.0)
    wrong = "atoll_00000000_" + "A" * 43
    for _ in range(5):
        assert (await srv.get("/v1/models", wrong))[0] == 401
    status, body, headers = await srv.get("/v1/models", wrong)
    assert status == 429 and body["error"]["code"] == "too_many_failed_auth"
    assert 1 <= int(headers["Retry-After"]) <= 3
    # the right token from the throttled address waits too (the attacker cannot tell)
    assert (await srv.get("/v1/models", srv.user))[0] == 429
    # health probes are never throttled
    assert (await srv.get("/healthz"))[0] == 200
    await asyncio.sleep(float(headers["Retry-After"]))
    assert (await srv.get("/v1/models", srv.user))[0] == 200
    status, body, _ = await srv.get("/admin/audit", srv.admin)
    assert status == 200
    throttled = [r for r in body["data"] if r["action"] == "auth.throttled"]
    assert len(throttled) == 1 and throttled[0]["source"] == "127.0.0.1"


async def test_usage_retention_purges_old_rows_and_last_used_is_written_once_a_minute(serve, state_dir) -> None:
    db = StateDB(state_dir / "atoll.db")
    old = (dt.datetime.now(dt.UTC) - dt.timedelta(days=40)).isoformat(timespec="milliseconds")
    for ts in (old, dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")):
        db.db.table("usage").insert({"ts": ts, "principal": "x", "endpoint": "chat", "model": "m", "status": "ok"})
    db.db.conn.close()
    srv = await serve(usage_retention_days=30)
    async with asyncio.timeout(10):
        while True:
            _, body, _ = await srv.get("/admin/usage", srv.admin)
            if len(body["data"]) == 1:
                break
            await asyncio.sleep(0.05)
    assert body["data"][0]["ts"] != old
    check = StateDB(state_dir / "atoll.db")

    def last_used(name: str) -> str | None:
        row = check.db.execute("SELECT last_used FROM tokens WHERE name = ?", [name]).fetchone()
        return row[0] if row else None

    assert (await srv.get("/v1/models", srv.user))[0] == 200
    async with asyncio.timeout(10):
        while last_used("tester") is None:
            await asyncio.sleep(0.05)
    first = last_used("tester")
    for _ in range(20):
        assert (await srv.get("/v1/models", srv.user))[0] == 200
    await srv.runner.app[SERVICES].background.drain()
    assert last_used("tester") == first  # not rewritten within the minute
    check.db.conn.close()
