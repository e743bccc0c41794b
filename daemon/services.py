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
from runtime.scheduler import ModelRunner, Scheduler, SchedulerConfig
from runtime.store import ModelStore, Variant

log = logging.getLogger(__name__)


@dataclass
class Services:
    """Everything a request handler may need, passed down explicitly."""

    settings: Settings
    db: StateDB
    store: ModelStore
    scheduler: Scheduler
    started: float = field(default_factory=time.monotonic)
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a small background job (e.g. a usage write), kept until done so shutdown can await it."""
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def start(self) -> None:
        """Start the parts in order: state DB, then the models."""
        await self.db.start()
        await self.scheduler.start()

    async def stop(self) -> None:
        """Stop the parts in reverse order, letting background writes finish."""
        await self.scheduler.stop()
        if self.background:
            await asyncio.gather(*self.background, return_exceptions=True)
        await self.db.stop()


SERVICES = web.AppKey("services", Services)
VERSION = web.AppKey("version", str)


def choose_variant(variants: list[Variant]) -> Variant:
    """The variant to serve: the first healthy one in catalog order, else the first (broken) one."""
    return next((v for v in variants if not v.broken), variants[0])


def bootstrap(settings: Settings) -> Services:
    """Open the store and the state DB and plan one runner per model family."""
    store = ModelStore(settings.state_dir)
    store.ensure()
    db = StateDB(settings.db_path)
    scheduler = Scheduler(SchedulerConfig(queue_size=settings.queue_size, request_timeout=settings.request_timeout,
                                          n_ctx=settings.n_ctx, threads=settings.threads,
                                          load_timeout=settings.load_timeout))
    for family, variants in store.families().items():
        if not variants:
            continue
        v = choose_variant(variants)
        scheduler.add(ModelRunner(family, v, str(store.blob_path(v.digest)), scheduler.config))
    if not scheduler.runners:
        log.warning("the model store at %s is empty: add a model with `atoll models add FILE.gguf`",
                    settings.state_dir)
    return Services(settings=settings, db=db, store=store, scheduler=scheduler)
