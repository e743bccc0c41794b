"""A real worker process driven over the typed protocol by the daemon's WorkerProcess."""

from __future__ import annotations

import asyncio
from pathlib import Path

from runtime import protocol as p
from runtime.worker_client import WorkerProcess, WorkerSpec


async def drain(q: asyncio.Queue[p.Event]) -> list[p.Event]:
    """A request's events up to its last one."""
    out: list[p.Event] = []
    async with asyncio.timeout(60):
        while not out or not isinstance(out[-1], p.FINAL):
            out.append(await q.get())
    return out


async def test_a_request_the_worker_cannot_read_is_answered_and_the_worker_carries_on(smollm2_path: Path) -> None:
    w = WorkerProcess(WorkerSpec(model_path=str(smollm2_path), n_ctx=512, threads=2))
    ready = await w.start()
    try:
        assert isinstance(ready, p.Ready) and ready.n_ctx == 512 and ready.chat
        bad = await drain(w.open("bad", p.Generate(prompt=5, max_tokens=2)))  # type: ignore[arg-type]
        assert [type(e) for e in bad] == [p.Error]
        assert isinstance(bad[0], p.Error) and bad[0].kind == "internal" and "5" not in bad[0].message
        # A long generation; the stats query is answered while it runs, and counts it.
        q = w.open("long", p.Generate(prompt="Once upon a time", max_tokens=200, temperature=0.0))
        assert isinstance(await q.get(), p.Start)
        stats = await w.stats()
        assert (stats.requests, stats.prompts) == (1, 1)  # the unreadable line was not a request
        w.cancel("long")
        events = await drain(q)
        assert isinstance(events[-1], p.Done) and events[-1].finish_reason == "cancelled"
        assert events[-1].completion_tokens < 200
    finally:
        await w.stop()
