"""The appliance image (image/build-image.sh --test) booted: systemd-nspawn for the service's life
cycle, qemu with TCG for the whole box: kernel, udev, USB sticks hot-plugged through QMP, the LAN.

Figures are printed (run with -s): boot to ready, stick inserted to serving, restart times.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.appliance.boot import NspawnBox, QemuBox, foreign_packets, http, make_stick, pcap_packets
from tests.e2e.conftest import free_port
from tests.e2e.test_sync_e2e import POLICY, make_bundle

pytestmark = pytest.mark.image
ROOT = Path(__file__).resolve().parents[2]
IMAGE = Path(os.environ.get("ATOLL_IMAGE", ROOT / ".cache" / "image"))
KEYS = Path(os.environ.get("ATOLL_IMAGE_KEYS", ROOT / ".cache" / "image-keys"))


@pytest.fixture(scope="module")
def image() -> Path:
    """The test image and the keys its first-boot bundle was signed with (image/test-image.sh makes both)."""
    for p in (IMAGE / "root.img", IMAGE / "rootfs", IMAGE / "token", KEYS / "release1.key"):
        if not p.exists():
            pytest.fail(f"{p} is missing: run image/test-image.sh (it builds the image)", pytrace=False)
    return IMAGE


def journal(box: NspawnBox | QemuBox) -> str:
    """This boot's journal of atoll.service."""
    return box.sh("journalctl -b -u atoll -o cat --no-pager")


def kill_and_watchdog(box: NspawnBox | QemuBox, restart_timeout: float) -> None:
    """SIGKILL: restarted with no orphaned worker. A hung event loop: restarted by the watchdog."""
    pid = int(box.show("MainPID")["MainPID"])
    workers = box.unit_pids() - {pid}
    assert workers, "no worker process in the unit"
    restarts = int(box.show("NRestarts")["NRestarts"])
    box.sh(f"kill -KILL {pid}")
    new, took = box.wait_active_pid(pid, restart_timeout)
    print(f"SIGKILL -> serving again in {took:.1f} s")
    assert not [w for w in workers if box.pid_alive(w)], "a worker outlived its daemon"
    assert len(box.unit_pids()) == 2  # the new daemon and its one worker, nothing left over
    assert int(box.show("NRestarts")["NRestarts"]) == restarts + 1

    box.sh(f"kill -USR2 {new}")  # the test image's hang trigger: the event loop blocks for good
    _, took = box.wait_active_pid(new, restart_timeout + 60)
    print(f"hung event loop -> restarted by the watchdog, serving again in {took:.1f} s")
    assert "Watchdog timeout" in journal(box)


def clean_stop(box: NspawnBox | QemuBox) -> None:
    """systemctl stop: drained and stopped within TimeoutStopSec, nothing killed."""
    before = journal(box).count("\n")
    box.sh("systemctl stop atoll", timeout=120)
    tail = "\n".join(journal(box).splitlines()[before:])
    assert "atoll stopped" in tail and "Deactivated successfully" in tail, tail
    assert "SIGKILL" not in tail and "Failed with result" not in tail, tail


def test_nspawn_notify_watchdog_and_shutdown(image: Path, tmp_path: Path) -> None:
    box = NspawnBox(image / "rootfs", tmp_path / "nspawn.log")
    try:
        box.wait_active_pid(0, 120)  # Type=notify: active only after READY=1
        print(f"nspawn: boot to READY {time.monotonic() - box.t_start:.1f} s")
        assert box.http("/readyz")[0] == 200  # READY=1 came after the API answered and the model loaded
        token = (image / "token").read_text().strip()
        status, body = box.http("/v1/chat/completions", token, {
            "model": "smollm2", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
            "temperature": 0}, timeout=120)
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] <= 8
        text = box.show("StatusText")["StatusText"]
        assert text.startswith("governor normal; models: smollm2 ready Q4_1; release 1"), text
        # levels reach the journal as priorities, with no timestamp of atoll's own
        warnings = box.sh("journalctl -b -u atoll -p warning -o cat --no-pager")
        assert "hardware.probe:" in warnings and "daemon.serve: atoll listening" not in warnings
        assert "daemon.serve: atoll listening on" in journal(box)
        assert not [line for line in journal(box).splitlines() if line[:4].isdigit()]
        # workers never talk to systemd
        worker = max(box.unit_pids())
        env = box.sh(f"tr '\\0' '\\n' < /proc/{worker}/environ")
        assert "NOTIFY_SOCKET" not in env and "WATCHDOG_USEC" not in env
        kill_and_watchdog(box, restart_timeout=60)
        clean_stop(box)
    finally:
        assert box.poweroff() == 0


@pytest.fixture(scope="module")
def sticks(image: Path, tmp_path_factory: pytest.TempPathFactory, smollm2_q4_0_path: Path,
           gemma_path: Path) -> dict[str, Path]:
    """Stick images: a newer signed bundle (family 'sea': SmolLM2 requantized to Q4_0, a model the box
    does not have), one whose signature was altered, one with a 253 MB model (to pull mid-copy), one
    with no bundle, one whose filesystem does not mount."""
    work = tmp_path_factory.mktemp("sticks")
    policy = work / "policy.toml"
    policy.write_text(POLICY)
    good = make_bundle(work / "good", KEYS, policy, 2, f"sea={smollm2_q4_0_path}")
    bad = make_bundle(work / "bad", KEYS, policy, 3, f"sea={smollm2_q4_0_path}")
    sigs_file = bad / "ATOLL" / "bundle.json.sigs"
    sigs = json.loads(sigs_file.read_text())
    raw = bytearray(base64.b64decode(sigs[0]["sig"]))
    raw[0] ^= 0x01
    sigs[0]["sig"] = base64.b64encode(bytes(raw)).decode()
    sigs_file.write_text(json.dumps(sigs))
    big = make_bundle(work / "big", KEYS, policy, 4, f"gemma3={gemma_path}")
    empty = work / "empty"
    (empty / "photos").mkdir(parents=True)
    (empty / "photos" / "README.txt").write_text("not a bundle\n")
    # ext4 that blkid recognises (its superblock is intact) but the kernel will not mount: the group
    # descriptors right after the superblock (block 1 of 4 KiB) point outside the filesystem
    broken = make_stick(empty, work / "broken.img", features="^metadata_csum")
    with broken.open("r+b") as f:
        f.seek(4096)
        f.write(b"\xff" * 64)
    return {"good": make_stick(good, work / "good.img"), "bad": make_stick(bad, work / "bad.img"),
            "big": make_stick(big, work / "big.img", size_mb=400), "empty": make_stick(empty, work / "empty.img"),
            "broken": broken}


@pytest.fixture
def qemu(image: Path, tmp_path: Path) -> Iterator[QemuBox]:
    """The disk image booted in qemu (TCG), on a copy-on-write snapshot."""
    box = QemuBox(image, tmp_path, free_port())
    try:
        yield box
    finally:
        box.poweroff()


def wait_models(box: QemuBox, token: str, want: dict[str, str], timeout: float) -> float:
    """Seconds until /v1/models lists exactly `want`."""
    t0 = time.monotonic()
    while True:
        status, body = http(box.url + "/v1/models", token, timeout=10)
        now = {m["id"]: m["state"] for m in body["data"]} if status == 200 else {}
        if now == want:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"{now} != {want}:\n{journal(box)[-3000:]}"
        time.sleep(0.5)


def test_qemu_the_whole_box(image: Path, qemu: QemuBox, sticks: dict[str, Path]) -> None:
    token = (image / "token").read_text().strip()
    box = qemu
    # boot to ready, reached from the host through the forwarded port only
    deadline = time.monotonic() + 600
    while http(box.url + "/readyz", timeout=5)[0] != 200:
        assert box.proc.poll() is None and time.monotonic() < deadline, box.console.read_text(errors="replace")
        time.sleep(0.5)
    print(f"qemu TCG: boot to /readyz 200 in {time.monotonic() - box.t_start:.1f} s")
    box.wait_shell()
    # served through the forwarded port. One token from a two-token prompt: on an emulated CPU a
    # single decode step of even this 135M model takes seconds (the chat itself is exercised in nspawn)
    t0 = time.monotonic()
    status, body = http(box.url + "/v1/completions", token, {
        "model": "smollm2", "prompt": "Hi", "max_tokens": 1, "temperature": 0}, timeout=600)
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 1
    print(f"qemu TCG: a one-token completion answered in {time.monotonic() - t0:.1f} s")

    # a stick with a newer signed bundle: mounted read-only by udev, imported, served; nobody touches the box
    # (release 2 serves family 'sea' only: a release replaces the previous release's families)
    t0 = time.monotonic()
    box.plug(sticks["good"], "stick1")
    took = wait_models(box, token, {"sea": "ready"}, timeout=1200)
    print(f"qemu TCG: stick inserted -> new model serving in {took:.1f} s")
    mounts = box.sh("findmnt -rn -o TARGET,OPTIONS | grep /run/media/atoll/")
    options = set(mounts.split()[1].split(","))
    assert {"ro", "nosuid", "nodev", "noexec"} <= options, mounts
    assert http(box.url + "/admin/bundles", token)[1]["current"]["sequence"] == 2
    box.unplug("stick1")
    deadline = time.monotonic() + 60
    while box.sh("findmnt -rn -o TARGET | grep -c /run/media/atoll/ || true").strip() != "0":
        assert time.monotonic() < deadline, "the stick was not unmounted when pulled"
        time.sleep(0.5)
    print(f"qemu TCG: stick handled end to end in {time.monotonic() - t0:.1f} s")

    # a stick whose signature was altered: refused, nothing changes
    before = http(box.url + "/admin/bundles", token)[1]
    box.plug(sticks["bad"], "stick2")
    deadline = time.monotonic() + 300
    while not (after := http(box.url + "/admin/bundles", token)[1])["last_error"]:
        assert time.monotonic() < deadline, after
        time.sleep(0.5)
    assert after["last_error"]["code"] == "bad_signature", after["last_error"]
    assert after["current"] == before["current"]
    wait_models(box, token, {"sea": "ready"}, timeout=10)
    box.unplug("stick2")

    # a stick with no bundle, a stick whose filesystem does not mount: nothing happens, nothing breaks
    box.plug(sticks["empty"], "stick3")
    box.plug(sticks["broken"], "stick4")
    deadline = time.monotonic() + 120
    while "photos" not in box.sh("ls /run/media/atoll/*/ 2>/dev/null || true"):
        assert time.monotonic() < deadline, "the stick with no bundle was not mounted"
        time.sleep(0.5)
    time.sleep(10)  # the watcher's settle scans (0.5, 2, 5 s) are over
    assert box.sh("findmnt -rn -o TARGET | grep -c /run/media/atoll/ || true").strip() == "1"  # broken one: not
    assert http(box.url + "/admin/bundles", token)[1]["current"] == before["current"]
    wait_models(box, token, {"sea": "ready"}, timeout=10)
    box.unplug("stick3")
    box.unplug("stick4")

    # a stick pulled while its 253 MB model is being copied: the import fails cleanly, the old release serves
    box.plug(sticks["big"], "stick5")
    deadline = time.monotonic() + 300
    while http(box.url + "/admin/bundles", token)[1]["progress"]["phase"] != "copying":
        assert time.monotonic() < deadline, "the import never started copying"
        time.sleep(0.2)
    box.unplug("stick5")
    deadline = time.monotonic() + 300
    while (st := http(box.url + "/admin/bundles", token)[1])["progress"]["phase"] not in ("idle", "failed", "done"):
        assert time.monotonic() < deadline, st
        time.sleep(0.5)
    assert st["current"] == before["current"] and st["last_error"], st
    print(f"qemu TCG: stick pulled mid-copy -> refused with {st['last_error']['code']}")
    wait_models(box, token, {"sea": "ready"}, timeout=10)
    assert box.sh("ls /var/lib/atoll/staging | wc -l").strip() == "0"

    kill_and_watchdog(box, restart_timeout=300)
    clean_stop(box)

    # nothing but the forwarded port (and DHCP on the link) ever crossed the box's network
    frames = pcap_packets(box.pcap)
    assert frames
    assert foreign_packets(frames) == []
