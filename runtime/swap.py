"""Hot swaps between a family's variants, carried out by its runner's supervisor.

A swap to another variant loads the new worker first when memory allows both (`overlap`),
pauses the queue only while the running request finishes (cancelled past
`swap_drain_seconds`), switches, then stops the old worker: queued requests wait, none
fails. When memory does not allow both, the old worker is drained and stopped before the
new one loads, and the queue holds requests meanwhile. A target variant that fails to load
is marked broken and the family stays on (or goes back to) its current variant.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from runtime.controls import SchedulerConfig
from runtime.errors import Unavailable
from runtime.store import Variant
from runtime.worker_client import WorkerProcess, WorkerSpec

log = logging.getLogger(__name__)


@dataclass
class SwapRecord:
    """One variant change, for /admin/hardware."""

    at: float
    from_digest: str
    to_digest: str
    n_ctx: int
    overlap: bool
    seconds: float | None = None
    outcome: str = "pending"

    def to_json(self) -> dict[str, Any]:
        """JSON-able form."""
        return dict(self.__dict__)


class SwapFailed(Exception):
    """The target variant could not be loaded."""


@dataclass
class SwapTarget:
    """A requested swap: the variant, where its blob is, how to load it; `done` says whether it succeeded."""

    variant: Variant
    path: str
    n_ctx: int
    n_gpu_layers: int
    overlap: bool
    done: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Swaps:
    """A runner's pending swap request (the newest wins) and the record of its last 50 swaps."""

    def __init__(self) -> None:
        self.history: collections.deque[SwapRecord] = collections.deque(maxlen=50)
        #: Set while a request waits for the supervisor.
        self.requested = asyncio.Event()
        self._target: SwapTarget | None = None

    def __iter__(self) -> Iterator[SwapRecord]:
        return iter(self.history)

    def request(self, target: SwapTarget) -> asyncio.Future[bool]:
        """Queue `target` for the supervisor (superseding an older request); return its outcome future."""
        if self._target is not None and not self._target.done.done():
            self._target.done.set_result(False)  # superseded by this newer decision
        self._target = target
        self.requested.set()
        return target.done

    def take(self) -> SwapTarget | None:
        """The request to carry out now, if one is waiting."""
        if not self.requested.is_set():
            return None
        self.requested.clear()
        return self._target


class Swappable(Protocol):
    """What a swap changes: a runner (runtime.runner.ModelRunner), seen from here without importing it."""

    family: str
    variant: Variant
    spec: WorkerSpec
    worker: WorkerProcess | None
    state: str
    reason: str | None
    ready: asyncio.Event
    config: SchedulerConfig
    swaps: Swaps

    def spec_for(self, variant: Variant, path: str, n_ctx: int, n_gpu_layers: int) -> WorkerSpec:
        """The worker spec that serves `variant`."""

    async def drain(self, seconds: float, reason: str) -> None:
        """Wait for the running job; past `seconds`, cancel it with `reason`."""


async def swap_variant(runner: Swappable, target: SwapTarget) -> None:
    """Switch `runner` to `target.variant` (see the module docstring); a failed load marks the variant broken."""
    variant, n_ctx, overlap, fut = target.variant, target.n_ctx, target.overlap, target.done
    rec = SwapRecord(at=time.time(), from_digest=runner.variant.digest, to_digest=variant.digest, n_ctx=n_ctx,
                     overlap=overlap)
    runner.swaps.history.append(rec)
    t0 = time.monotonic()
    new_spec = runner.spec_for(variant, target.path, n_ctx, target.n_gpu_layers)
    old = runner.worker
    drain_reason = f"model {runner.family} is switching to another variant"
    try:
        if overlap:
            new = WorkerProcess(new_spec)
            try:
                await new.start()
            except Unavailable as e:
                raise SwapFailed(e.message) from None
            runner.ready.clear()
            await runner.drain(runner.config.swap_drain_seconds, drain_reason)
        else:
            runner.ready.clear()
            runner.state = "swapping"
            await runner.drain(runner.config.swap_drain_seconds, drain_reason)
            if old is not None:
                await old.stop()
            new = WorkerProcess(new_spec)
            try:
                await new.start()
            except Unavailable as e:
                runner.worker = None  # the supervisor reloads the current variant
                raise SwapFailed(e.message) from None
        runner.worker, runner.spec, runner.variant = new, new_spec, variant
        runner.state, runner.reason = "ready", None
        runner.ready.set()
        if overlap and old is not None:
            await old.stop()
        rec.outcome, rec.seconds = "ok", round(time.monotonic() - t0, 3)
        log.info("model %s now serves %s (n_ctx %d) after a %.2f s swap", runner.family,
                 variant.quantization, n_ctx, rec.seconds)
        if not fut.done():
            fut.set_result(True)
    except SwapFailed as e:
        variant.broken = f"failed to load at swap time: {e}"
        rec.outcome, rec.seconds = f"failed: {e}", round(time.monotonic() - t0, 3)
        log.error("model %s: variant %s is broken (%s); staying on %s", runner.family, variant.digest[:12], e,
                  runner.variant.quantization)
        if runner.worker is not None and not runner.worker.exited.is_set():
            runner.state = "ready"
            runner.ready.set()
        if not fut.done():
            fut.set_result(False)
