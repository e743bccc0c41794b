"""Long-running watches of the update side: `current` changed from the shell, the prompt
retention purge, and USB sticks. Each survives its own errors (logged once per kind of
failure) and has async start()/stop()."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from daemon.db import StateDB
from daemon.enforce import Limits
from daemon.imports import ImportService
from daemon.release_apply import ReleaseApplier
from sync.state import current_target
from sync.watch import UsbWatcher

log = logging.getLogger(__name__)


class _Periodic(abc.ABC):
    """A task that runs `tick()` every `interval` seconds; an error in a tick is logged (once
    while it repeats) and the task goes on."""

    name = "periodic"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._failing: str | None = None

    @abc.abstractmethod
    async def tick(self) -> None:
        """One round of work."""

    async def start(self) -> None:
        """Start the task."""
        self._task = asyncio.create_task(self._loop(), name=f"atoll-{self.name}")

    async def stop(self) -> None:
        """Cancel the task and wait for it."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
                if self._failing:
                    log.info("%s works again", self.name)
                self._failing = None
            except Exception as e:
                kind = type(e).__name__
                if self._failing != kind:
                    log.exception("%s failed; still serving what was loaded, trying again in %g s",
                                  self.name, self.interval)
                self._failing = kind


class CurrentWatcher(_Periodic):
    """Reloads when `current` changes outside the daemon (`atoll import`/`rollback` from a shell)."""

    name = "watch on current"

    def __init__(self, state_dir: Path, applier: ReleaseApplier, imports: ImportService,
                 interval: float = 2.0) -> None:
        super().__init__(interval)
        self.state_dir, self.applier, self.imports = state_dir, applier, imports

    async def tick(self) -> None:
        """Reload if `current` points elsewhere than what was last applied."""
        seen = await asyncio.to_thread(current_target, self.state_dir)
        if seen != self.applier.applied and not self.imports.manager.busy:
            log.info("release changed outside the daemon (now %s): reloading", seen)
            try:
                await self.applier.reload()
            finally:
                self.applier.applied = seen  # a failed reload is reported once, not every tick


class RetentionPurge(_Periodic):
    """Blanks the prompt text of usage records older than the policy's retention: within a
    couple of seconds of a policy setting one, then hourly."""

    name = "prompt retention purge"

    def __init__(self, db: StateDB, limits: Limits, interval: float = 2.0, every: float = 3600.0) -> None:
        super().__init__(interval)
        self.db, self.limits, self.every = db, limits, every
        self._last: float | None = None

    async def tick(self) -> None:
        """Purge if the policy sets a retention and the last purge is `every` seconds old."""
        days = self.limits.prompt_retention_days
        now = asyncio.get_running_loop().time()
        if days and (self._last is None or now - self._last >= self.every):
            self._last = now
            cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
            n = await self.db.run(self.db.purge_prompt_text, cutoff.isoformat())
            log.info("blanked the prompt text of %d usage records older than %d days", n, days)


def usb_watcher(media_dirs: str, enabled: bool,
                run_import: Callable[[Path], Awaitable[object]]) -> UsbWatcher | None:
    """The USB watcher over the colon-separated media dirs, importing each stick found (None if off)."""
    media = [Path(p) for p in media_dirs.split(":") if p] if enabled else []
    if not media:
        return None

    async def from_usb(stick: Path) -> None:
        log.info("update bundle found on %s", stick)
        try:
            r = await run_import(stick)
            log.info("bundle from %s: %s", stick, r)
        except Exception as e:
            log.error("bundle from %s refused or failed: %s", stick, getattr(e, "message", "internal error"))

    return UsbWatcher(from_usb, media)
