"""The typed container of the daemon's long-lived parts, built in one bootstrap function."""

from __future__ import annotations

import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiohttp import web

from daemon.config import Settings
from daemon.db import StateDB
from daemon.enforce import Limits
from daemon.governance import HardwareControl, make_source
from daemon.security import Security
from daemon.tasks import Background
from daemon.updates import Updates
from hardware.probe import Prober
from runtime.scheduler import Scheduler, SchedulerConfig
from runtime.store import ModelStore

log = logging.getLogger(__name__)


@dataclass
class Services:
    """Everything a request handler may need, passed down explicitly."""

    settings: Settings
    db: StateDB
    store: ModelStore
    scheduler: Scheduler
    hardware: HardwareControl
    updates: Updates
    limits: Limits
    background: Background
    security: Security
    started: float = field(default_factory=time.monotonic)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a small background job (e.g. a usage write), kept until done so shutdown can await it."""
        self.background.spawn(coro)

    async def start(self) -> None:
        """Start the parts in order: state DB, the models, the governor."""
        await self.db.start()
        await self.security.start(self.db, self.hardware.governor, lambda: self.limits.audit_retention_days)
        await self.scheduler.start()
        await self.hardware.start()
        await self.updates.start()

    async def stop(self) -> None:
        """Stop the parts in reverse order, letting background writes finish."""
        await self.updates.stop()
        await self.hardware.stop()
        await self.scheduler.stop()
        await self.security.stop()
        await self.background.drain()
        await self.db.stop()


SERVICES = web.AppKey("services", Services)
VERSION = web.AppKey("version", str)


def package_version() -> str:
    """Installed version of atoll, or 0+source when run from a checkout."""
    try:
        return version("atoll")
    except PackageNotFoundError:
        return "0+source"


def bootstrap(settings: Settings) -> Services:
    """Open the store and state DB, finish or undo an interrupted update, read the sensors once,
    put the installed policy in force and plan one runner per served model family."""
    store = ModelStore(settings.state_dir)
    store.ensure()
    db = StateDB(settings.db_path)
    security = Security.open(settings.state_dir, db, idle_minutes=settings.session_idle_minutes,
                             absolute_hours=settings.session_absolute_hours, lockout_minutes=settings.lockout_minutes,
                             backoff_seconds=settings.login_backoff_seconds,
                             password_min_length=settings.password_min_length)
    scheduler = Scheduler(SchedulerConfig(queue_size=settings.queue_size, request_timeout=settings.request_timeout,
                                          n_ctx=settings.n_ctx, threads=settings.threads,
                                          load_timeout=settings.load_timeout,
                                          swap_drain_seconds=settings.swap_drain_seconds))
    prober = Prober(make_source(settings))
    hardware = HardwareControl(settings, store, scheduler, prober)
    limits = Limits(log_prompts=settings.log_prompts)
    background = Background()
    updates = Updates(settings, store, scheduler, hardware, db, limits, package_version(), background)
    updates.bootstrap(prober.read())
    if not scheduler.runners:
        log.warning("no models to serve in %s: add one with `atoll models add FILE.gguf` or import a bundle",
                    settings.state_dir)
    return Services(settings=settings, db=db, store=store, scheduler=scheduler, hardware=hardware,
                    updates=updates, limits=limits, background=background, security=security)
