"""The real daemon started as a subprocess (the installed `atoll` console script) on loopback."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ATOLL = str(Path(sys.executable).with_name("atoll"))


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str) -> int:
    """Status of a GET, 0 when nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


class Daemon:
    """A running `atoll serve` and what it printed."""

    def __init__(self, state_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state_dir = state_dir
        self.lines: list[str] = []
        self._token: str | None = None
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(
            [ATOLL, "serve", "--state-dir", str(state_dir), "--host", "127.0.0.1", "--port", str(self.port),
             "--threads", "2", *(extra or ("--no-usb-watch",))],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_ready(self, timeout: float = 60) -> float:
        """Block until /readyz is 200; return seconds since start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("daemon exited:\n" + "".join(self.lines))
            if http_status(self.url + "/readyz") == 200:
                return time.monotonic() - self.t_start
            time.sleep(0.02)
        raise AssertionError("daemon not ready in time:\n" + "".join(self.lines))

    def token(self) -> str:
        """An admin API token, made on the box with `atoll token create` (the daemon prints none)."""
        if self._token is None:
            name = f"e2e-{len(self.lines)}-{time.monotonic_ns()}"
            r = subprocess.run([ATOLL, "token", "create", "--role", "admin", "--name", name, "--state-dir",
                                str(self.state_dir)], capture_output=True, text=True, timeout=60, check=False)
            assert r.returncode == 0, r.stderr
            self._token = r.stdout.strip()
        return self._token

    def setup_code(self) -> str:
        """The one-time setup code printed on first start."""
        for line in self.lines:
            m = re.search(r"\b([0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4})\b", line)
            if m:
                return m.group(1)
        raise AssertionError("no setup code printed:\n" + "".join(self.lines))

    def stop(self) -> int:
        """SIGTERM and wait; return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        return int(self.proc.returncode)


@pytest.fixture
def daemon(state_dir: Path) -> Iterator[Daemon]:
    """The real daemon over a state dir that holds SmolLM2 and no tokens (first start)."""
    d = Daemon(state_dir)
    try:
        yield d
    finally:
        d.stop()
