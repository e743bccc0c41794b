"""Scheduling requests onto workers: the served models by name, and box-wide admission control.

Each served model family is a `runtime.runner.ModelRunner` (supervised worker, bounded
queue, hot swaps); `runtime.controls.Controls` is the box-wide admission and concurrency.

Shutdown (SIGTERM) is `Scheduler.shutdown`: admission closes (new requests: 503
`shutting_down` with Retry-After), no queued request is dispatched any more, every queued
request is answered 503 `shutting_down` with Retry-After, and running generations get
the drain time to finish; past it they are cancelled and their streams end with an
error event (503 `interrupted`). Then `stop` stops the workers.
"""

from __future__ import annotations

import asyncio
import logging

from runtime.controls import Controls, SchedulerConfig
from runtime.errors import NotFound
from runtime.runner import Job, ModelRunner

log = logging.getLogger(__name__)

__all__ = ["Controls", "Job", "ModelRunner", "Scheduler", "SchedulerConfig"]


class Scheduler:
    """All served models by name, and the controls they share."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.controls = Controls()
        self.runners: dict[str, ModelRunner] = {}

    def add(self, runner: ModelRunner) -> None:
        """Register a model runner under its family name."""
        self.runners[runner.family] = runner

    async def start(self) -> None:
        """Start every runner (models load in parallel in their workers)."""
        for r in self.runners.values():
            await r.start()

    async def shutdown(self, drain_seconds: float, retry_after: float) -> None:
        """Stop taking and dispatching work, refuse the queued requests, drain the running ones."""
        reason = "the service is shutting down"
        self.controls.close(f"{reason}; retry later", retry_after, code="shutting_down")
        for r in self.runners.values():
            r.pause_dispatch()
            r.fail_queued("shutting_down", f"{reason} before this request could start; retry it later",
                          retry_after)
        await asyncio.gather(*(r.drain(drain_seconds, reason) for r in self.runners.values()))

    async def stop(self) -> None:
        """Stop every runner."""
        await asyncio.gather(*(r.stop() for r in self.runners.values()))

    def get(self, name: str) -> ModelRunner:
        """The runner serving `name`, or 404."""
        r = self.runners.get(name)
        if r is None:
            raise NotFound(f"model {name!r} does not exist; GET /v1/models lists the served models",
                           code="model_not_found", param="model")
        return r

    def any_ready(self) -> bool:
        """Whether at least one model is loaded and answering."""
        return any(r.state == "ready" for r in self.runners.values())
