"""The daemon's side of signed updates, assembled from parts that each own one job:

- `daemon.imports.ImportService`: imports (USB, upload, path) and rollback, last outcome, status;
- `daemon.smoke.ModelHealthCheck`: the loading health check (shared with `atoll import`);
- `daemon.release_apply.ReleaseApplier`: serialized reloads; `PolicyEnforcer` (daemon.enforce)
  puts the policy in force, `RunnerFactory` creates the runners;
- `daemon.watchers`: the watch on `current` (an `atoll import`/`rollback` from a shell is
  noticed within a couple of seconds), the prompt retention purge, the USB watcher.

`Updates` builds them, starts and stops them in order, and is what the handlers reach.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from daemon.config import Settings
from daemon.db import StateDB
from daemon.enforce import Limits
from daemon.governance import HardwareControl
from daemon.imports import ImportService
from daemon.release_apply import ReleaseApplier
from daemon.tasks import Background
from daemon.watchers import CurrentWatcher, RetentionPurge, usb_watcher
from hardware.probe import Snapshot
from runtime.scheduler import Scheduler
from runtime.store import ModelStore
from sync.apply import SyncManager
from sync.state import Release

log = logging.getLogger(__name__)


class Updates:
    """The update parts of one daemon, built together and started/stopped in order."""

    def __init__(self, settings: Settings, store: ModelStore, scheduler: Scheduler, hardware: HardwareControl,
                 db: StateDB, limits: Limits, version: str, background: Background) -> None:
        self.applier = ReleaseApplier(settings, store, scheduler, hardware, limits)
        self.imports = ImportService(settings, hardware, db, self.applier, version, background)
        self.applier.enforcer.on_change = lambda policy: self.imports.audit(
            "policy.changed", {"policy": dataclasses.asdict(policy) if policy else None})
        self.current_watch = CurrentWatcher(settings.state_dir, self.applier, self.imports)
        self.purge = RetentionPurge(db, limits)
        self.usb = usb_watcher(settings.media_dirs, settings.usb_watch, self._import_stick)

    async def _import_stick(self, stick: Any) -> Any:
        return (await self.imports.run_import(stick)).status

    @property
    def manager(self) -> SyncManager:
        """The sync manager (progress, state)."""
        return self.imports.manager

    def release(self) -> Release | None:
        """The installed signed release, if any."""
        return self.applier.release()

    def bootstrap(self, snap: Snapshot | None) -> None:
        """Before serving: recover from an interrupted import, apply the installed policy, plan runners."""
        recovered = self.imports.recover()
        if recovered:
            log.warning("update recovery: %s", recovered)
        self.applier.plan_at_start(snap)

    def status(self) -> dict[str, Any]:
        """What GET /admin/bundles shows."""
        return self.imports.status([str(d) for d in self.usb.media_dirs] if self.usb else [])

    async def start(self) -> None:
        """Start the USB watcher, the watch on `current` and the retention purge."""
        if self.usb:
            await self.usb.start()
        await self.current_watch.start()
        await self.purge.start()

    async def stop(self) -> None:
        """Stop watching; an import in progress is cancelled by the runtime's shutdown."""
        await self.purge.stop()
        await self.current_watch.stop()
        if self.usb:
            await self.usb.stop()
