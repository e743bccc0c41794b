"""systemd's side of the daemon: notifications (Type=notify), the watchdog ping, journal logging.

What atoll.service is told, and when:
- ``STATUS=`` from the start, and again whenever it changes: governor state, each served family
  with its state and quantization, the installed release.
- ``READY=1`` once the API answers (the listening socket is up before this part starts) and every
  served family has *settled*: its worker is ready, or it is marked broken, or its first load
  failed (it keeps retrying with backoff, and STATUS says so). One family that cannot load must
  not keep the whole API from being declared up, nor make systemd kill the box in a loop.
- ``RELOADING=1`` when a release switch starts applying (import, rollback, `current` changed on
  disk) and ``READY=1`` when it is done.
- ``WATCHDOG=1`` every half ``WatchdogSec=`` from a task on the event loop, so a hung loop stops
  the pings; a ping is sent only while every model's supervisor task is alive, so a dead
  supervisor gets the service restarted too.
- ``STOPPING=1`` when SIGTERM/SIGINT arrives.

Workers never notify: runtime.worker_client removes ``NOTIFY_SOCKET`` from their environment (and
``NotifyAccess=main`` in the unit would ignore them anyway).

The hang trigger for the image test: with ``ATOLL_TEST_HANG_SIGNAL=1`` in the environment (set
only by the test image's drop-in, never by the shipped unit), SIGUSR2 blocks the event loop for
good, so the test sees the watchdog restart a hung daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping

from daemon.services import Services

log = logging.getLogger(__name__)

#: How often readiness and STATUS are re-evaluated (cheap: reads in-memory state).
POLL_SECONDS = 0.2
#: Runner states that count as settled for READY=1 (restarting: its first load failed).
SETTLED = frozenset({"ready", "broken", "restarting"})


class Notifier:
    """Sends sd_notify datagrams to ``$NOTIFY_SOCKET``; does nothing when it is not set."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        addr = environ.get("NOTIFY_SOCKET") or None
        if addr and addr.startswith("@"):
            addr = "\0" + addr[1:]
        self.address = addr
        self.watchdog_seconds = _watchdog_seconds(environ)
        self._failed = False

    @classmethod
    def from_env(cls) -> Notifier:
        """A notifier for this process's environment."""
        return cls(os.environ)

    def send(self, *fields: str) -> bool:
        """Send one datagram of newline-separated KEY=VALUE fields; False when not sent (never raises)."""
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as s:
                s.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            if not self._failed:  # log once: systemd will say the rest (timeout, watchdog)
                log.warning("cannot notify systemd at %s: %s", self.address.lstrip("\0"), e)
                self._failed = True
            return False
        return True


def _watchdog_seconds(environ: Mapping[str, str]) -> float | None:
    """WatchdogSec= in seconds when systemd asked this very process for pings, else None."""
    usec, pid = environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value / 1e6 if value > 0 else None


def monotonic_usec() -> str:
    """The MONOTONIC_USEC= field systemd wants with RELOADING=1."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


class ServiceNotify:
    """The daemon's notifications over its life; start() after the API listens, stop() at the end."""

    def __init__(self, notifier: Notifier, services: Services) -> None:
        self.notifier = notifier
        self.services = services
        self.ready_sent = False
        self.reloading = False
        self._status = ""
        self._release = "none"
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Begin the STATUS/READY task and, when systemd asked for one, the watchdog ping."""
        self.services.updates.applier.reload_listeners.append(self._on_reload)
        await self._refresh_release()
        self._tasks.append(asyncio.create_task(self._lifecycle(), name="atoll-notify"))
        if self.notifier.watchdog_seconds:
            self._tasks.append(asyncio.create_task(self._watchdog(self.notifier.watchdog_seconds / 2),
                                                   name="atoll-watchdog"))
        if os.environ.get("ATOLL_TEST_HANG_SIGNAL") == "1":
            log.warning("test hang trigger armed: SIGUSR2 blocks the event loop (test images only)")
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, _hang)

    def stopping(self) -> None:
        """Tell systemd the shutdown has begun."""
        self.notifier.send("STOPPING=1", "STATUS=stopping: draining requests")

    async def stop(self) -> None:
        """Stop the notification tasks."""
        with contextlib.suppress(ValueError):
            self.services.updates.applier.reload_listeners.remove(self._on_reload)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    # -- what is said --------------------------------------------------------------------------

    def settled(self) -> bool:
        """Whether every served family is ready, broken, or has failed its first load."""
        return all(r.state in SETTLED for r in self.services.scheduler.runners.values())

    def status_line(self) -> str:
        """One STATUS= line: governor state, each family's state and quantization, the release."""
        runners = self.services.scheduler.runners
        models = ", ".join(f"{name} {r.state} {r.variant.quantization}" for name, r in sorted(runners.items()))
        governor = self.services.hardware.governor.state.name.lower()
        phase = "reloading; " if self.reloading else "" if self.ready_sent else "starting; "
        return f"{phase}governor {governor}; models: {models or 'none'}; release {self._release}"

    async def _refresh_release(self) -> None:
        rel = await asyncio.to_thread(self.services.updates.release)
        self._release = "none" if rel is None else f"{rel.sequence} (version {rel.version})"

    def _send_status(self, *extra: str) -> None:
        line = self.status_line()
        if line != self._status or extra:
            self._status = line
            self.notifier.send(*extra, f"STATUS={line}")

    # -- when ----------------------------------------------------------------------------------

    async def _lifecycle(self) -> None:
        while True:
            if not self.ready_sent and not self.reloading and self.settled():
                self.ready_sent = True
                self._send_status("READY=1")
                log.info("ready: %s", self._status)
            else:
                self._send_status()
            await asyncio.sleep(POLL_SECONDS)

    def _on_reload(self, starting: bool) -> None:
        """Called by Updates.reload at its start (True) and end (False)."""
        if starting:
            self.reloading = True
            self._send_status("RELOADING=1", monotonic_usec())
            return
        self.reloading = False
        task = asyncio.create_task(self._reloaded(), name="atoll-notify-reloaded")
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _reloaded(self) -> None:
        await self._refresh_release()
        if self.ready_sent:
            self._send_status("READY=1")

    def dead_supervisors(self) -> list[str]:
        """Families whose supervisor task has died (empty when all is well)."""
        return [name for name, r in self.services.scheduler.runners.items() if not r.alive()]

    async def _watchdog(self, every: float) -> None:
        complained = False
        while True:
            dead = self.dead_supervisors()
            if not dead:
                self.notifier.send("WATCHDOG=1")
                complained = False
            elif not complained:
                log.error("the worker supervisor of %s is not running: withholding the watchdog ping so "
                          "systemd restarts the service", ", ".join(sorted(dead)))
                complained = True
            await asyncio.sleep(every)


def _hang() -> None:
    log.warning("SIGUSR2 with ATOLL_TEST_HANG_SIGNAL=1: blocking the event loop until the watchdog acts")
    while True:
        time.sleep(3600)


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message`` for journald: it stamps the time and reads the level itself."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        """Prefix every line of the record with its syslog priority."""
        prio = self.PRIORITY.get(record.levelno, 6)
        text = f"{record.name}: {super().format(record)}"
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def stderr_is_journal(environ: Mapping[str, str]) -> bool:
    """Whether stderr is connected to journald (systemd sets JOURNAL_STREAM=dev:inode)."""
    want = environ.get("JOURNAL_STREAM")
    if not want:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def configure_logging(level: str) -> None:
    """Log to stderr: with levels and no timestamps under journald, with timestamps in a terminal."""
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal(os.environ):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
