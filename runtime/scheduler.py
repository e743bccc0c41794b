"""Scheduling requests onto workers: the served models by name, and box-wide admission control.

Each served model family is a `runtime.runner.ModelRunner` (supervised worker, bounded
queue, hot swaps). `Controls` is what the governor turns: whether new work is admitted
at all (closed while the box is critical: 503 with Retry-After), and how many
generations may run at once across all models (fewer while constrained).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from runtime.errors import NotFound, Unavailable
from runtime.runner import Job, ModelRunner

log = logging.getLogger(__name__)

__all__ = ["Controls", "Job", "ModelRunner", "Scheduler", "SchedulerConfig"]


@dataclass
class SchedulerConfig:
    """Knobs the scheduler takes from the daemon's settings."""

    queue_size: int = 16
    request_timeout: float = 300.0
    n_ctx: int = 2048
    threads: int = 2
    load_timeout: float = 120.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    swap_drain_seconds: float = 30.0


class Controls:
    """Box-wide admission and concurrency, set by the governor."""

    def __init__(self) -> None:
        self.admitting = True
        self.reason = ""
        self.retry_after = 30.0
        #: Most generations running at once across all models; 0 = no limit.
        self.limit = 0
        self._active = 0
        self._cond = asyncio.Condition()

    def check_admission(self) -> None:
        """Raise 503 with Retry-After while admission is closed."""
        if not self.admitting:
            raise Unavailable(self.reason, code="overloaded", retry_after=self.retry_after)

    def close(self, reason: str, retry_after: float) -> None:
        """Stop admitting new work."""
        self.admitting, self.reason, self.retry_after = False, reason, retry_after

    def open(self) -> None:
        """Admit new work again."""
        self.admitting, self.reason = True, ""

    async def set_limit(self, limit: int) -> None:
        """Change the concurrency limit (0 = none); running work is not interrupted."""
        async with self._cond:
            self.limit = limit
            self._cond.notify_all()

    async def acquire(self) -> None:
        """Wait for a generation slot."""
        async with self._cond:
            await self._cond.wait_for(lambda: self.limit == 0 or self._active < self.limit)
            self._active += 1

    async def release(self) -> None:
        """Give a generation slot back."""
        async with self._cond:
            self._active -= 1
            self._cond.notify_all()


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
