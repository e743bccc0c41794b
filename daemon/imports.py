"""The daemon's import and rollback service: every path (USB stick, admin upload or path,
and the result of `atoll import` from the shell) ends in `sync.apply.SyncManager`, and a
committed change is handed to `ReleaseApplier.reload()`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from typing import Any

from daemon.config import Settings
from daemon.db import StateDB
from daemon.governance import HardwareControl
from daemon.release_apply import ReleaseApplier
from daemon.smoke import ModelHealthCheck
from daemon.tasks import Background
from hardware.probe import Snapshot
from sync.apply import ImportResult, SyncManager
from sync.health import DEFAULT_HEALTH_CHECKS
from sync.state import Release

log = logging.getLogger(__name__)


def _outcome(event: str) -> str:
    return "refused" if event.endswith(".rejected") else "failed" if event.endswith(".failed") else "ok"


class ImportService:
    """Runs imports and rollbacks, remembers the last outcome, applies the result."""

    def __init__(self, settings: Settings, hardware: HardwareControl, db: StateDB, applier: ReleaseApplier,
                 version: str, background: Background) -> None:
        self.db, self.applier, self._background = db, applier, background
        self._prober = hardware.prober
        loading = ModelHealthCheck(threads=settings.threads, load_timeout=settings.load_timeout,
                                   placement=lambda: hardware.policy, snapshot=self._snapshot, record=self.audit)
        self.manager = SyncManager(settings.state_dir, settings.sync_config(version),
                                   health_checks=(*DEFAULT_HEALTH_CHECKS, loading), audit=self.audit)
        self.last_result: dict[str, Any] | None = None
        self.last_error: dict[str, Any] | None = None
        #: held while a bundle upload is received and imported: a second upload is refused (409)
        #: before any of it is written
        self.uploads = asyncio.Lock()

    async def _snapshot(self) -> Snapshot | None:
        return await self._prober.snapshot()

    def audit(self, event: str, detail: dict[str, Any]) -> None:
        """Record a sync event in the audit log (from the event loop or, at start-up, directly)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # start-up recovery, before the loop runs
            self.db.audit("sync", event, _outcome(event), **detail)
            return
        self._background.spawn(self.db.run(self.db.audit, "sync", event, _outcome(event), **detail))

    def recover(self) -> str | None:
        """Start-up: finish or undo an interrupted import (before serving)."""
        return self.manager.recover()

    async def run_import(self, path: str | os.PathLike[str], *, tar: bool = False) -> ImportResult:
        """Import a bundle (directory or tar) and apply it to the service."""
        try:
            result = await (self.manager.import_tar(path) if tar else self.manager.import_bundle(path))
        except Exception as e:
            self.last_error = {"path": str(path), "error": getattr(e, "message", "internal error"),
                               "code": getattr(e, "code", "internal_error")}
            raise
        self.last_result, self.last_error = result.to_json(), None
        await self.applier.reload()
        return result

    async def rollback(self) -> Release:
        """Return to the previous release and apply it."""
        rel = await self.manager.rollback()
        await self.applier.reload()
        return rel

    def status(self, media_dirs: list[str]) -> dict[str, Any]:
        """What GET /admin/bundles shows."""
        rel = self.applier.release()
        return {
            "current": None if rel is None else {"sequence": rel.sequence, "version": rel.version,
                                                 "families": sorted(rel.families)},
            "state": dataclasses.asdict(self.manager.state()),
            "progress": self.manager.progress.snapshot(),
            "last_result": self.last_result, "last_error": self.last_error,
            "media_dirs": media_dirs,
        }
