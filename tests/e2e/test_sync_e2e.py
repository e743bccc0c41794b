"""Sneakernet end to end: keys and bundles made with the `atoll` admin commands, a stick that
appears under a watched media directory, and the real daemon serving the new model.
Also `atoll import` from the shell while the daemon runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from sync.policy import EXAMPLE_POLICY
from tests.e2e.conftest import ATOLL, Daemon

pytestmark = pytest.mark.slow

POLICY = EXAMPLE_POLICY.read_text().replace('allowed_families = ["smollm2"]',
                                            'allowed_families = ["smollm2", "gemma3", "sea"]')


def atoll(*args: str) -> str:
    r = subprocess.run([ATOLL, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"atoll {' '.join(args)}: {r.stderr}"
    return r.stdout


def wait_served(d: Daemon, token: str, want: dict[str, str], timeout: float = 30) -> None:
    """Poll /v1/models until it lists exactly `want`."""
    deadline = time.monotonic() + timeout
    while (now := served(d, token)) != want:
        assert time.monotonic() < deadline, now
        time.sleep(0.05)


def provision(state_dir: Path, tmp_path: Path) -> Path:
    """Make a root key and a release key with the admin commands and install root v1 on the box."""
    keys = tmp_path / "keys"
    atoll("keys", "generate", "root1", "--out", str(keys))
    atoll("keys", "generate", "release1", "--out", str(keys))
    atoll("trust", "init", "--root-key", str(keys / "root1.pub.json"), "--bundle-key",
          str(keys / "release1.pub.json"), "--expires", "365d", "--sign", str(keys / "root1.key"),
          "--install", "--state-dir", str(state_dir))
    return keys


def make_bundle(out: Path, keys: Path, policy: Path, sequence: int, model: str) -> Path:
    """`atoll bundle create` + `atoll bundle sign` with the release key."""
    atoll("bundle", "create", "--model", model, "--policy", str(policy), "--sequence", str(sequence),
          "--expires", "30d", "--out", str(out), "--root-version", "1")
    atoll("bundle", "sign", str(out), "--key", str(keys / "release1.key"))
    return out


def served(d: Daemon, token: str) -> dict[str, str]:
    req = urllib.request.Request(d.url + "/v1/models", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body: Any = json.load(r)
    return {m["id"]: m["state"] for m in body["data"]}


def test_stick_inserted_to_new_model_serving(state_dir: Path, tmp_path: Path, gemma_path: Path,
                                             smollm2_path: Path) -> None:
    keys = provision(state_dir, tmp_path)
    assert oct((keys / "root1.key").stat().st_mode & 0o777) == "0o600"
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    b1 = make_bundle(tmp_path / "b1", keys, policy, 1, f"gemma3={gemma_path}")
    atoll("bundle", "verify", str(b1), "--state-dir", str(state_dir))

    media = tmp_path / "media"
    media.mkdir()
    d = Daemon(state_dir, "--media-dirs", str(media), "--usb-watch")
    try:
        d.wait_ready()
        token = d.token()
        assert served(d, token) == {"smollm2": "ready"}
        t0 = time.monotonic()
        shutil.copytree(b1, media / "USBSTICK")  # the stick is plugged in and mounted
        deadline = t0 + 120
        while served(d, token).get("gemma3") != "ready":
            assert time.monotonic() < deadline, "".join(d.lines)
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        print(f"stick inserted -> gemma-3-270m (253 MB) serving: {elapsed:.2f} s")
        assert served(d, token) == {"gemma3": "ready", "smollm2": "ready"}
        # the stick was only read
        assert sorted(p.name for p in (media / "USBSTICK" / "ATOLL").iterdir()) == \
            sorted(p.name for p in (b1 / "ATOLL").iterdir())

        # `atoll import` from the shell while the daemon runs: the daemon notices and serves it
        b2 = make_bundle(tmp_path / "b2", keys, policy, 2, f"sea={smollm2_path}")
        out = json.loads(atoll("import", str(b2), "--state-dir", str(state_dir)))
        assert out["status"] == "installed" and out["sequence"] == 2
        wait_served(d, token, {"sea": "ready", "smollm2": "ready"})
    finally:
        d.stop()


def test_daemon_killed_mid_import_comes_back_on_the_old_release(state_dir: Path, tmp_path: Path,
                                                                 smollm2_path: Path) -> None:
    import contextlib
    import os
    import signal
    import threading

    import psutil

    keys = provision(state_dir, tmp_path)
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    b1 = make_bundle(tmp_path / "b1", keys, policy, 1, f"sea={smollm2_path}")

    d = Daemon(state_dir)
    d.wait_ready()
    token = d.token()
    children = psutil.Process(d.proc.pid).children(recursive=True)
    req = urllib.request.Request(d.url + "/admin/bundles", data=json.dumps({"path": str(b1)}).encode(),
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    def post() -> None:
        with contextlib.suppress(OSError):  # the daemon dies under it
            urllib.request.urlopen(req, timeout=60)

    threading.Thread(target=post, daemon=True).start()
    # SIGKILL the daemon while the new release is being health-checked (built, not yet switched to)
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline
        st = json.load(urllib.request.urlopen(urllib.request.Request(
            d.url + "/admin/bundles", headers={"Authorization": f"Bearer {token}"}), timeout=5))
        if st["progress"]["phase"] == "health_check":
            break
        time.sleep(0.01)
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    d.stop()
    # its workers notice their pipe closing and exit too
    deadline = time.monotonic() + 10
    while any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children):
        assert time.monotonic() < deadline, "orphaned workers"
        time.sleep(0.1)
    # restarted: start-up recovery undoes the half-done import; the old models serve
    d2 = Daemon(state_dir)
    try:
        d2.wait_ready()
        assert served(d2, token) == {"smollm2": "ready"}
        st = json.load(urllib.request.urlopen(urllib.request.Request(
            d2.url + "/admin/bundles", headers={"Authorization": f"Bearer {token}"}), timeout=5))
        assert st["current"] is None and st["state"]["pending"] is None
        assert not (state_dir / "releases" / "1").exists()
        # and the same stick imports cleanly now
        again = urllib.request.Request(d2.url + "/admin/bundles", data=json.dumps({"path": str(b1)}).encode(),
                                       headers={"Authorization": f"Bearer {token}",
                                                "Content-Type": "application/json"})
        r = urllib.request.urlopen(again, timeout=60)
        assert json.load(r)["status"] == "installed"
        wait_served(d2, token, {"sea": "ready", "smollm2": "ready"})
    finally:
        d2.stop()
