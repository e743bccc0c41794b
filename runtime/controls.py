"""Box-wide knobs shared by every model runner: the scheduler's settings and the admission controls.

`Controls` is what the governor (and shutdown) turns: whether new work is admitted at all
(closed while the box is critical or stopping: 503 with Retry-After), and how many
generations may run at once across all models (fewer while constrained).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from runtime.errors import Unavailable


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
        self.code = "overloaded"
        self.retry_after = 30.0
        #: Most generations running at once across all models; 0 = no limit.
        self.limit = 0
        self._active = 0
        self._cond = asyncio.Condition()

    def check_admission(self) -> None:
        """Raise 503 with Retry-After while admission is closed."""
        if not self.admitting:
            raise Unavailable(self.reason, code=self.code, retry_after=self.retry_after)

    def close(self, reason: str, retry_after: float, code: str = "overloaded") -> None:
        """Stop admitting new work; new requests get 503 `code` with Retry-After."""
        self.admitting, self.reason, self.retry_after, self.code = False, reason, retry_after, code

    def open(self) -> None:
        """Admit new work again."""
        self.admitting, self.reason, self.code = True, "", "overloaded"

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
