"""The typed container of the daemon's long-lived parts, built in one bootstrap function."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from daemon.config import Settings
from daemon.db import StateDB
from daemon.governance import HardwareControl, make_source, placement_policy
from hardware.governor import State
from hardware.probe import Prober
from runtime.placement import decide
from runtime.runner import ModelRunner
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
    started: float = field(default_factory=time.monotonic)
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a small background job (e.g. a usage write), kept until done so shutdown can await it."""
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def start(self) -> None:
        """Start the parts in order: state DB, the models, the governor."""
        await self.db.start()
        await self.scheduler.start()
        await self.hardware.start()

    async def stop(self) -> None:
        """Stop the parts in reverse order, letting background writes finish."""
        await self.hardware.stop()
        await self.scheduler.stop()
        if self.background:
            await asyncio.gather(*self.background, return_exceptions=True)
        await self.db.stop()


SERVICES = web.AppKey("services", Services)
VERSION = web.AppKey("version", str)


def bootstrap(settings: Settings) -> Services:
    """Open the store and the state DB, read the sensors once, and plan one runner per model family."""
    store = ModelStore(settings.state_dir)
    store.ensure()
    db = StateDB(settings.db_path)
    scheduler = Scheduler(SchedulerConfig(queue_size=settings.queue_size, request_timeout=settings.request_timeout,
                                          n_ctx=settings.n_ctx, threads=settings.threads,
                                          load_timeout=settings.load_timeout,
                                          swap_drain_seconds=settings.swap_drain_seconds))
    prober = Prober(make_source(settings))
    families = {f: vs for f, vs in store.families().items() if vs}
    decisions = decide(families, prober.read(), State.NORMAL, placement_policy(settings))
    for family, variants in families.items():
        d = decisions[family]
        v, n_ctx = d.variant, d.n_ctx
        if v is None:
            healthy = [x for x in variants if not x.broken]
            v = min(healthy, key=lambda x: x.size) if healthy else variants[0]
            if healthy:
                log.warning("model %s: %s; trying its smallest variant %s", family, d.why, v.quantization)
        scheduler.add(ModelRunner(family, v, str(store.blob_path(v.digest)), scheduler.config, scheduler.controls,
                                  n_ctx=n_ctx, variants=variants))
    if not scheduler.runners:
        log.warning("the model store at %s is empty: add a model with `atoll models add FILE.gguf`",
                    settings.state_dir)
    hardware = HardwareControl(settings, store, scheduler, prober)
    hardware.decisions = decisions
    return Services(settings=settings, db=db, store=store, scheduler=scheduler, hardware=hardware)
