"""systemd notify and watchdog, against the real daemon and a real notify socket (a unix datagram
socket this test binds, named in NOTIFY_SOCKET as systemd does); workers die with the daemon."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from daemon.notify import JournalFormatter, Notifier, ServiceNotify
from daemon.services import SERVICES
from tests.e2e.conftest import Daemon
from tests.e2e.test_sync_e2e import POLICY, make_bundle, provision


class NotifySocket:
    """A bound AF_UNIX datagram socket collecting (monotonic time, message) pairs in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, field: str, after: int = 0, timeout: float = 60) -> int:
        """Index of the first message from `after` on holding the line `field`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, (_, m) in enumerate(self.messages[after:], start=after):
                if field in m.split("\n"):
                    return i
            time.sleep(0.01)
        raise AssertionError(f"no {field} in {self.messages[after:]}")

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    """NOTIFY_SOCKET and a 1 s WatchdogSec in the environment the daemon is started with."""
    ns = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(ns.path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield ns
    ns.close()


def get(d: Daemon, path: str, token: str) -> Any:
    req = urllib.request.Request(d.url + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


@pytest.mark.slow
def test_notify_sequence_from_the_real_daemon(state_dir: Path, tmp_path: Path, smollm2_path: Path,
                                              notify_socket: NotifySocket) -> None:
    keys = provision(state_dir, tmp_path)
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    bundle = make_bundle(tmp_path / "b1", keys, policy, 1, f"sea={smollm2_path}")
    d = Daemon(state_dir)
    try:
        ready = notify_socket.wait_for("READY=1")
        t_ready = notify_socket.messages[ready][0]
        # at READY the API answers and every family is settled (here: loaded)
        token = d.token()
        assert {m["id"]: m["state"] for m in get(d, "/v1/models", token)["data"]} == {"smollm2": "ready"}
        before = [m for _, m in notify_socket.messages[:ready]]
        assert before and all(m.startswith("STATUS=starting; governor normal; models: smollm2 ")
                              for m in before if "WATCHDOG=1" not in m)
        assert "STATUS=governor normal; models: smollm2 ready Q4_1; release none" in \
            notify_socket.messages[ready][1].split("\n")

        # the watchdog: every half WatchdogSec (0.5 s) from the event loop
        time.sleep(2.2)
        pings = [t for t, m in notify_socket.messages if m == "WATCHDOG=1" and t > t_ready]
        assert len(pings) >= 4
        assert max(b - a for a, b in itertools.pairwise(pings)) < 0.9

        # workers get no NOTIFY_SOCKET (only the daemon may talk to systemd)
        pid = get(d, "/admin/status", token)["models"][0]["worker_pid"]
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not [e for e in environ if e.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_"))]

        # a release switch: RELOADING=1 ... READY=1, STATUS names the new release
        n = len(notify_socket.messages)
        req = urllib.request.Request(d.url + "/admin/bundles", data=json.dumps({"path": str(bundle)}).encode(),
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert json.load(r)["status"] == "installed"
        reloading = notify_socket.wait_for("RELOADING=1", after=n)
        assert any(f.startswith("MONOTONIC_USEC=") for f in notify_socket.messages[reloading][1].split("\n"))
        again = notify_socket.wait_for("READY=1", after=reloading)
        assert "release 1 (version 1)" in notify_socket.messages[again][1]

        n = len(notify_socket.messages)
        assert d.stop() == 0
        stopping = notify_socket.wait_for("STOPPING=1", after=n, timeout=5)
        assert not [m for _, m in notify_socket.messages[stopping + 1:] if "READY=1" in m]
    finally:
        d.stop()


@pytest.mark.slow
def test_sigkill_of_the_daemon_takes_its_workers(state_dir: Path, tmp_path: Path) -> None:
    d = Daemon(state_dir)
    try:
        d.wait_ready()
        token = d.token()
        pid = get(d, "/admin/status", token)["models"][0]["worker_pid"]
        worker = psutil.Process(pid)
        assert worker.ppid() == d.proc.pid
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait()
        worker.wait(timeout=5)  # raises TimeoutExpired if the worker outlived its parent
    finally:
        d.stop()


CHILD = """
import os, sys, time
from runtime.lifeline import PARENT_ENV
os.environ[PARENT_ENV] = str(os.getppid())
from runtime.lifeline import die_with_parent
die_with_parent()
print("armed", flush=True)
time.sleep(60)   # busy: not reading stdin, as a worker loading a model or a long prompt is
"""

PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=sys.stdout, start_new_session=True)
print(child.pid, flush=True)
child.wait()
"""


def test_a_busy_worker_dies_with_its_parent() -> None:
    """PR_SET_PDEATHSIG: a child that never reads its pipe is killed when its parent is SIGKILLed."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert parent.stdout is not None
    child = psutil.Process(int(parent.stdout.readline()))
    assert parent.stdout.readline().strip() == "armed"
    parent.kill()
    parent.wait()
    child.wait(timeout=5)


def test_notifier_without_socket_is_silent_and_watchdog_env_is_respected() -> None:
    assert Notifier({}).send("READY=1") is False
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_seconds == 30
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_seconds is None
    assert Notifier({"WATCHDOG_USEC": "x"}).watchdog_seconds is None
    assert Notifier({"NOTIFY_SOCKET": "/nonexistent/sock"}).send("READY=1") is False


async def test_a_dead_supervisor_stops_the_watchdog_pings(make_app: Any, tmp_path: Path) -> None:
    ns = NotifySocket(tmp_path / "n.sock")
    try:
        a = await make_app()
        services = a.app[SERVICES]
        sn = ServiceNotify(Notifier({"NOTIFY_SOCKET": str(ns.path), "WATCHDOG_USEC": "200000"}), services)
        await sn.start()
        await asyncio.sleep(0.5)
        assert [m for _, m in ns.messages if m == "WATCHDOG=1"]
        runner = services.scheduler.runners["smollm2"]
        runner._tasks[0].cancel()  # the supervisor dies
        await asyncio.sleep(0.15)
        assert sn.dead_supervisors() == ["smollm2"]
        n = len(ns.messages)
        await asyncio.sleep(0.5)
        assert not [m for _, m in ns.messages[n:] if m == "WATCHDOG=1"]
        await sn.stop()
    finally:
        ns.close()


def test_journal_lines_carry_the_level_and_no_timestamp() -> None:
    rec = logging.LogRecord("daemon.x", logging.WARNING, __file__, 1, "two\nlines", None, None)
    assert JournalFormatter("%(message)s").format(rec) == "<4>daemon.x: two\n<4>lines"
