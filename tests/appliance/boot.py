"""Boot the appliance image built by image/build-image.sh --test: in systemd-nspawn (fast, no udev)
or in qemu-system-x86_64 with TCG (full: kernel, udev, USB hot-plug through QMP, user networking)."""

from __future__ import annotations

import abc
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any


def http(url: str, token: str | None = None, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
    """GET (or POST JSON) and return (status, decoded JSON or None); status 0 when nothing answers."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as r:
            return int(r.status), json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        with contextlib.suppress(ValueError):
            return int(e.code), json.loads(e.read() or b"null")
        return int(e.code), None
    except OSError:
        return 0, None


class Box(abc.ABC):
    """What both ways of booting offer: run a shell command in the guest, ask the unit."""

    @abc.abstractmethod
    def sh(self, command: str, timeout: float = 60) -> str:
        """Run a shell command as root in the guest; return its stdout (raises on non-zero status)."""

    def show(self, *props: str) -> dict[str, str]:
        """`systemctl show atoll` properties."""
        out = self.sh("systemctl show atoll " + " ".join(f"-p {p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def unit_pids(self) -> set[int]:
        """Every process in atoll.service's cgroup."""
        out = self.sh("cat /sys/fs/cgroup/system.slice/atoll.service/cgroup.procs 2>/dev/null || "
                      "cat /sys/fs/cgroup/systemd/system.slice/atoll.service/cgroup.procs")
        return {int(x) for x in out.split()}

    proc: subprocess.Popen[bytes]

    def _wait_or_kill(self, timeout: float) -> int:
        """Wait for the booted machine's process to exit, killing its group after `timeout`; its status."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        return int(self.proc.returncode)

    def pid_alive(self, pid: int) -> bool:
        """Whether a pid exists in the guest."""
        return self.sh(f"test -d /proc/{pid} && echo yes || echo no").strip() == "yes"

    def wait_active_pid(self, old_pid: int, timeout: float) -> tuple[int, float]:
        """Wait until the unit is active with a main pid other than old_pid; return it and the seconds taken."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                p = self.show("ActiveState", "SubState", "MainPID")
            except AssertionError:  # systemd not answering yet (booting)
                time.sleep(0.5)
                continue
            if p.get("ActiveState") == "active" and p.get("SubState") == "running" and p.get("MainPID") not in (
                    "0", str(old_pid)):
                return int(p["MainPID"]), time.monotonic() - t0
            time.sleep(0.5)
        state = self.show("ActiveState", "SubState")
        raise AssertionError(f"atoll.service not running again within {timeout} s: {state}"
                             f"\n{self.sh('journalctl -u atoll --no-pager -n 40')}")


class NspawnBox(Box):
    """The image's tree booted by systemd-nspawn on a throwaway overlay (the tree is not changed)."""

    def __init__(self, rootfs: Path, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-D", str(rootfs), "--volatile=overlay", "-b", "--register=no", "--keep-unit",
             "--console=passive", "--private-network", f"--machine=atoll-{uuid.uuid4().hex[:8]}"],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.t_start = time.monotonic()
        self.leader = 0
        deadline = time.monotonic() + 30
        while not self.leader:
            assert self.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            r = subprocess.run(["pgrep", "-x", "systemd", "-P", str(self.proc.pid)], capture_output=True, text=True)
            self.leader = int(r.stdout.split()[0]) if r.stdout.split() else 0
            time.sleep(0.05)

    def sh(self, command: str, timeout: float = 60) -> str:
        """Run a command inside the container (all its namespaces) with nsenter."""
        r = subprocess.run(["nsenter", "-t", str(self.leader), "-a", "/bin/sh", "-c", command],
                           capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"{command}: {r.returncode} {r.stderr}"
        return r.stdout

    def http(self, path: str, token: str | None = None, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
        """An HTTP call to the daemon from inside the container's network namespace (host Python)."""
        script = ("import json, sys; sys.path.insert(0, sys.argv[1]); from boot import http; "
                  "print(json.dumps(http(*json.loads(sys.argv[2]))))")
        args = json.dumps([f"http://127.0.0.1:8080{path}", token, body, timeout])
        r = subprocess.run(["nsenter", "-t", str(self.leader), "-n", "python3", "-c", script,
                            str(Path(__file__).parent), args], capture_output=True, text=True, timeout=timeout + 10)
        assert r.returncode == 0, r.stderr
        status, data = json.loads(r.stdout)
        return int(status), data

    def poweroff(self, timeout: float = 60) -> int:
        """Orderly shutdown (SIGTERM to nspawn = poweroff in the container); the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self._wait_or_kill(timeout)


class QemuBox(Box):
    """The disk image booted by qemu with TCG: virtio disk (snapshot: the image is not changed),
    user networking with the daemon's port forwarded, an xHCI controller for sticks, QMP, a packet
    dump of the guest's only network link, the console and a root shell on serial ports."""

    def __init__(self, image: Path, work: Path, port: int, memory_mb: int = 2048) -> None:
        self.work = work
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.pcap = work / "net.pcap"
        self.console = work / "console.log"
        qmp, shell = work / "qmp.sock", work / "shell.sock"
        cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", str(memory_mb),
               "-display", "none", "-no-reboot",
               "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
               "-append", "root=/dev/vda rw console=ttyS0 quiet",
               "-drive", f"file={image / 'root.img'},if=virtio,format=raw,snapshot=on",
               "-device", "qemu-xhci,id=xhci",
               "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:8080",
               "-device", "virtio-net-pci,netdev=n0",
               "-object", f"filter-dump,id=dump0,netdev=n0,file={self.pcap}",
               "-serial", f"file:{self.console}",
               "-serial", f"unix:{shell},server=on,wait=off",
               "-qmp", f"unix:{qmp},server=on,wait=off"]
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=(work / "qemu.log").open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._qmp = self._connect(qmp)
        self._qmp_file = self._qmp.makefile("rwb")
        self._qmp_file.readline()  # greeting
        self.qmp("qmp_capabilities")
        self._shell = self._connect(shell)
        self._shell_buf = b""
        self.events: list[dict[str, Any]] = []

    def _connect(self, path: Path) -> socket.socket:
        deadline = time.monotonic() + 30
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                return s
            except OSError:
                s.close()
                assert self.proc.poll() is None, (self.work / "qemu.log").read_text()
                assert time.monotonic() < deadline, f"no {path}"
                time.sleep(0.1)

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command; return its result (events seen meanwhile go to self.events)."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._qmp_file.write(json.dumps(msg).encode() + b"\n")
        self._qmp_file.flush()
        while True:
            reply = json.loads(self._qmp_file.readline())
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise AssertionError(f"QMP {command}: {reply['error']}")
            return reply.get("return")

    def sh(self, command: str, timeout: float = 120) -> str:
        """Run a command through the test image's root shell on ttyS1; output between two markers."""
        tag = uuid.uuid4().hex[:12]
        self._shell.sendall(f"echo B{tag}; ( {command} ) 2>&1; echo E{tag} $?\n".encode())
        pattern = re.compile(rf"B{tag}\n(.*)E{tag} (\d+)\n".encode(), re.S)
        deadline = time.monotonic() + timeout
        self._shell.settimeout(1)
        while not (m := pattern.search(self._shell_buf)):
            assert time.monotonic() < deadline, f"no answer to {command!r}: {self._shell_buf[-2000:]!r}"
            with contextlib.suppress(TimeoutError):
                chunk = self._shell.recv(65536)
                assert chunk, "the guest shell closed"
                self._shell_buf += chunk
        self._shell_buf = self._shell_buf[m.end():]
        out, status = m.group(1).decode(errors="replace"), int(m.group(2))
        assert status == 0, f"{command}: status {status}: {out}"
        return out

    def wait_shell(self, timeout: float = 300) -> None:
        """Wait until the guest's root shell answers (the guest has booted far enough)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sh("true", timeout=5)
                return
            except AssertionError:
                assert self.proc.poll() is None, self.console.read_text(errors="replace")
                assert time.monotonic() < deadline, self.console.read_text(errors="replace")[-4000:]

    def plug(self, stick: Path, name: str) -> None:
        """Hot-plug a raw disk image as a read-only USB stick."""
        self.qmp("blockdev-add", driver="raw", **{"node-name": f"{name}-node"},
                 file={"driver": "file", "filename": str(stick), "read-only": True}, **{"read-only": True})
        self.qmp("device_add", driver="usb-storage", id=name, drive=f"{name}-node", bus="xhci.0", removable=True)

    def unplug(self, name: str, timeout: float = 60) -> None:
        """Pull the stick: remove the USB device, then its block node."""
        self.qmp("device_del", id=name)
        deadline = time.monotonic() + timeout
        while not any(e["event"] == "DEVICE_DELETED" and e.get("data", {}).get("device") == name
                      for e in self.events):
            assert time.monotonic() < deadline, f"{name} not removed"
            self.qmp("query-status")
            time.sleep(0.2)
        self.qmp("blockdev-del", **{"node-name": f"{name}-node"})

    def poweroff(self, timeout: float = 120) -> int:
        """`systemctl poweroff` in the guest, then wait for qemu to exit."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, AssertionError):
                self._shell.sendall(b"systemctl poweroff\n")
        return self._wait_or_kill(timeout)


def make_stick(src: Path, out: Path, size_mb: int = 256, features: str = "") -> Path:
    """An ext4 disk image holding the tree `src` (readable by anyone, as a vfat stick would be)."""
    tree = out.with_suffix(".tree")
    shutil.copytree(src, tree)
    for p in [tree, *tree.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "ATOLLSTICK", *(["-O", features] if features else []),
                    "-d", str(tree), str(out), f"{size_mb}M"], check=True)
    shutil.rmtree(tree)
    return out


def pcap_packets(path: Path) -> list[bytes]:
    """Ethernet frames of a classic pcap file (what qemu's filter-dump writes)."""
    data = path.read_bytes()
    magic = struct.unpack("<I", data[:4])[0]
    end = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    pos, frames = 24, []
    while pos + 16 <= len(data):
        _, _, incl, _ = struct.unpack(end + "IIII", data[pos:pos + 16])
        frames.append(data[pos + 16:pos + 16 + incl])
        pos += 16 + incl
    return frames


def foreign_packets(frames: list[bytes], guest_port: int = 8080) -> list[str]:
    """Frames that are neither the forwarded port's TCP, DHCP, nor ARP: what the box sent or got beyond them."""
    bad = []
    for f in frames:
        ethertype = struct.unpack("!H", f[12:14])[0]
        if ethertype == 0x0806:  # ARP on the link
            continue
        if ethertype != 0x0800:
            bad.append(f"ethertype {ethertype:#06x}")
            continue
        ip = f[14:]
        ihl, proto = (ip[0] & 0x0F) * 4, ip[9]
        src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
        sport, dport = struct.unpack("!HH", ip[ihl:ihl + 4]) if proto in (6, 17) else (0, 0)
        if proto == 6 and guest_port in (sport, dport):
            continue
        if proto == 17 and {sport, dport} == {67, 68}:
            continue
        bad.append(f"proto {proto} {src}:{sport} -> {dst}:{dport}")
    return bad
