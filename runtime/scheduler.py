"""Scheduling requests onto workers: one bounded queue and one supervised worker per served model.

A `ModelRunner` owns a family's worker process. Its supervisor restarts the worker
with exponential backoff when it dies; requests that were in flight get a 503
(`WorkerCrashed`), requests still queued wait for the restart. Its dispatcher feeds
queued jobs to the worker one at a time. A full queue refuses new jobs with 429 and a
Retry-After estimated from recent job durations. Every job has a deadline; a job that
is cancelled (the client went away) is removed from the queue or, if running, told to
stop, and the worker stops within a token.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import (
    BadRequest,
    ContextLengthExceeded,
    DeadlineExceeded,
    NotFound,
    QueueFull,
    Unavailable,
    WorkerCrashed,
)
from runtime.store import Variant
from runtime.worker_client import WorkerProcess, WorkerSpec

log = logging.getLogger(__name__)

_ids = itertools.count(1)


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


@dataclass
class Job:
    """One request on its way through a runner."""

    request: dict[str, Any]
    deadline: float
    id: str = field(default_factory=lambda: f"j{next(_ids)}")
    events: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when the worker is done with the job (or it left the queue); `final` is the worker's last event.
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    final: dict[str, Any] | None = None
    cancelled: bool = False
    enqueued: float = field(default_factory=time.monotonic)


class ModelRunner:
    """A served model: its variant, its supervised worker, its queue."""

    def __init__(self, family: str, variant: Variant, path: str, config: SchedulerConfig) -> None:
        self.family = family
        self.variant = variant
        self.config = config
        self.spec = WorkerSpec(model_path=path, n_ctx=config.n_ctx, threads=config.threads,
                               embedding=variant.task == "embed",
                               pooling="model" if variant.info and variant.info.is_embedding_model else "mean",
                               load_timeout=config.load_timeout)
        self.state = "broken" if variant.broken else "stopped"
        self.reason: str | None = variant.broken
        self.worker: WorkerProcess | None = None
        self.ready = asyncio.Event()
        self.restarts = 0
        self.queue: collections.deque[Job] = collections.deque()
        self.running: Job | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._durations: collections.deque[float] = collections.deque(maxlen=20)

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the supervisor and dispatcher (a broken model starts neither)."""
        if self.state == "broken":
            return
        self.state = "loading"
        self._tasks = [asyncio.create_task(self._supervise(), name=f"supervise-{self.family}"),
                       asyncio.create_task(self._dispatch(), name=f"dispatch-{self.family}")]

    async def stop(self) -> None:
        """Fail queued jobs, stop the worker and the tasks."""
        self._stopping = True
        self.state = "stopped"
        while self.queue:
            self.queue.popleft().events.put_nowait({"ev": "error", "kind": "unavailable",
                                                    "message": "the service is shutting down"})
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.worker:
            await self.worker.stop()

    async def _supervise(self) -> None:
        backoff = self.config.backoff_initial
        while not self._stopping:
            self.worker = WorkerProcess(self.spec)
            started = time.monotonic()
            try:
                info = await self.worker.start()
            except Unavailable as e:
                self.state, self.reason = "restarting", e.message
                log.error("model %s: %s; retrying in %.1f s", self.family, e.message, backoff)
            else:
                self.state, self.reason = "ready", None
                log.info("model %s ready: worker pid %s, n_ctx %s, loaded in %.2f s", self.family,
                         self.worker.pid, info.get("n_ctx"), info.get("load_seconds", 0))
                self.ready.set()
                await self.worker.exited.wait()
                self.ready.clear()
                if self._stopping:
                    return
                self.restarts += 1
                self.state = "restarting"
                self.reason = f"worker exited with status {self.worker.proc and self.worker.proc.returncode}"
                if time.monotonic() - started > 60:
                    backoff = self.config.backoff_initial
                log.error("model %s: %s; restarting in %.1f s", self.family, self.reason, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.backoff_max)

    async def _dispatch(self) -> None:
        while True:
            while not self.queue:
                self._wake.clear()
                await self._wake.wait()
            await self.ready.wait()
            if not self.queue:
                continue
            job = self.queue.popleft()
            if job.cancelled:
                job.finished.set()
                continue
            if time.monotonic() > job.deadline:
                job.events.put_nowait({"ev": "error", "kind": "deadline",
                                       "message": "the request waited in the queue past its deadline"})
                job.finished.set()
                continue
            await self._run(job)

    async def _run(self, job: Job) -> None:
        worker = self.worker
        assert worker is not None
        self.running = job
        t0 = time.monotonic()
        try:
            q = worker.open(job.id, job.request)
        except WorkerCrashed as e:
            job.events.put_nowait({"ev": "error", "kind": "crash", "message": e.message})
            self.running = None
            job.finished.set()
            return
        job.started.set()
        try:
            while True:
                ev = await q.get()
                job.events.put_nowait(ev)
                if ev["ev"] in ("done", "error", "embedding", "crash"):
                    job.final = ev
                    break
        finally:
            worker.close(job.id)
            self.running = None
            job.finished.set()
            self._durations.append(time.monotonic() - t0)

    # -- requests -----------------------------------------------------------------------

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue's expected drain time, at least 1."""
        avg = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, math.ceil(avg * (len(self.queue) + 1)))

    def submit(self, request: dict[str, Any], timeout: float | None = None) -> Job:
        """Queue a request; raise QueueFull or Unavailable if it cannot be accepted."""
        if self.state == "broken":
            raise Unavailable(f"model {self.family} is broken: {self.reason}", code="model_broken")
        if self.state == "stopped":
            raise Unavailable(f"model {self.family} is not running")
        if len(self.queue) >= self.config.queue_size:
            raise QueueFull(f"model {self.family} has {len(self.queue)} requests waiting; try again later",
                            retry_after=self.retry_after())
        job = Job(request=request, deadline=time.monotonic() + (timeout or self.config.request_timeout))
        self.queue.append(job)
        self._wake.set()
        return job

    def cancel(self, job: Job) -> None:
        """Withdraw a job: drop it from the queue or stop its generation."""
        if job.cancelled:
            return
        job.cancelled = True
        if self.running is job and self.worker is not None:
            self.worker.cancel(job.id)
        else:
            with contextlib.suppress(ValueError):
                self.queue.remove(job)
            job.finished.set()

    async def stream(self, job: Job) -> AsyncGenerator[dict[str, Any]]:
        """Yield the job's events until it ends, raising API errors; cancel it if abandoned."""
        finished = False
        try:
            while True:
                remaining = job.deadline - time.monotonic()
                try:
                    async with asyncio.timeout(max(remaining, 0)):
                        ev = await job.events.get()
                except TimeoutError:
                    raise DeadlineExceeded(f"the request did not finish within its deadline "
                                           f"of {self.config.request_timeout:.0f} s") from None
                kind = ev["ev"]
                if kind in ("done", "embedding"):
                    finished = True
                    yield ev
                    return
                if kind == "crash":
                    finished = True
                    raise WorkerCrashed(f"the worker serving {self.family} crashed (status "
                                        f"{ev.get('returncode')}); it is being restarted, retry the request",
                                        retry_after=1)
                if kind == "error":
                    finished = True
                    raise _worker_error(ev)
                yield ev
        finally:
            if not finished:
                self.cancel(job)

    def status(self) -> dict[str, Any]:
        """What this runner is doing, for /admin/status and `atoll status`."""
        info = self.worker.ready_info if self.worker and self.state == "ready" else {}
        return {
            "model": self.family, "state": self.state, "reason": self.reason,
            "variant": self.variant.digest, "quantization": self.variant.quantization,
            "task": self.variant.task, "worker_pid": self.worker.pid if self.worker and self.state == "ready"
            else None, "n_ctx": info.get("n_ctx"), "chat": info.get("chat"),
            "queued": len(self.queue), "running": self.running is not None, "restarts": self.restarts,
        }


def _worker_error(ev: dict[str, Any]) -> Exception:
    kind, msg = ev.get("kind"), str(ev.get("message", "worker error"))
    if kind == "context_length":
        return ContextLengthExceeded(msg)
    if kind == "bad_request":
        return BadRequest(msg)
    if kind == "deadline":
        return DeadlineExceeded(msg)
    if kind in ("unavailable", "crash"):
        return Unavailable(msg)
    return Unavailable(f"the model failed on this request: {msg}", code="inference_failed")


class Scheduler:
    """All served models by name."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
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
