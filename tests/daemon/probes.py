"""Probes the daemon tests share."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


async def healthz_latencies(app: Any, done: Callable[[], bool]) -> list[float]:
    """Time each /healthz answer (each must be 200) until `done()` is true."""
    out = []
    while not done():
        t0 = time.perf_counter()
        r = await app.client.get("/healthz")
        assert r.status == 200
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(0.01)
    return out
