"""Small fire-and-forget jobs of the daemon (usage and audit writes), kept until done."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class Background:
    """Runs small jobs in the background and lets shutdown wait for them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` as a task held until it finishes."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for every job still running (their errors are not raised here)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
