"""One served model family: its supervised worker, its bounded queue, and hot swaps between variants.

The supervisor restarts a worker that dies, with exponential backoff; requests that
were in flight get a 503 (`WorkerCrashed`), requests still queued wait for the restart.
The dispatcher feeds queued jobs to the worker one at a time, within the box-wide
concurrency limit. A full queue refuses new jobs with 429 and a Retry-After estimated
from recent job durations. A job that is cancelled (the client went away) leaves the
queue or, if running, is told to stop, and the worker stops within a token.

Swaps to another variant are requested here and carried out by the supervisor
(runtime.swap has how).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from runtime import protocol as p
from runtime.controls import Controls, SchedulerConfig
from runtime.errors import (
    BadRequest,
    ContextLengthExceeded,
    DeadlineExceeded,
    QueueFull,
    Unavailable,
    WorkerCrashed,
)
from runtime.store import Variant
from runtime.swap import Swaps, SwapTarget, swap_variant
from runtime.worker_client import WorkerProcess, WorkerSpec

log = logging.getLogger(__name__)

_ids = itertools.count(1)
#: How often a job waiting without events checks whether its client is still connected.
CLIENT_POLL_SECONDS = 0.1


class ClientGone(ConnectionResetError):
    """The client of a job closed its connection; the job was withdrawn."""


@dataclass
class Job:
    """One request on its way through a runner."""

    request: p.Generate | p.Embed
    deadline: float
    id: str = field(default_factory=lambda: f"j{next(_ids)}")
    events: asyncio.Queue[p.Event] = field(default_factory=asyncio.Queue)
    #: Set when the worker is done with the job (or it left the queue); `final` is the worker's last event.
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    final: p.Event | None = None
    cancelled: bool = False
    #: Why the daemon (not the client) cancelled it, e.g. the governor went critical.
    cancel_reason: str | None = None
    #: The variant that ran it (set when a worker takes it; a swap may happen while it waits).
    digest: str | None = None


class ModelRunner:
    """A served model: its variants, its supervised worker, its queue."""

    def __init__(self, family: str, variant: Variant, path: str, config: SchedulerConfig, controls: Controls,
                 n_ctx: int | None = None, variants: list[Variant] | None = None, n_gpu_layers: int = 0) -> None:
        self.family = family
        self.variant = variant
        self.variants = variants if variants is not None else [variant]
        self.config = config
        self.controls = controls
        self.spec = self.spec_for(variant, path, n_ctx or config.n_ctx, n_gpu_layers)
        self.state = "broken" if variant.broken else "stopped"
        self.reason: str | None = variant.broken
        self.worker: WorkerProcess | None = None
        self.ready = asyncio.Event()
        self.restarts = 0
        self.queue: collections.deque[Job] = collections.deque()
        self.running: Job | None = None
        self.swaps = Swaps()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._paused = False
        self._durations: collections.deque[float] = collections.deque(maxlen=20)

    def spec_for(self, variant: Variant, path: str, n_ctx: int, n_gpu_layers: int) -> WorkerSpec:
        """The worker spec that serves `variant` from `path` with this runner's settings."""
        return WorkerSpec(model_path=path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, threads=self.config.threads,
                          embedding=variant.task == "embed",
                          pooling="model" if variant.info and variant.info.is_embedding_model else "mean",
                          load_timeout=self.config.load_timeout)

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
        self.fail_queued("unavailable", "the service is shutting down")
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.worker:
            await self.worker.stop()

    def alive(self) -> bool:
        """Whether its supervisor and dispatcher run (a broken or stopped runner has none and counts as alive)."""
        return self.state in ("broken", "stopped") or (bool(self._tasks) and not any(t.done() for t in self._tasks))

    async def _start_worker(self) -> bool:
        self.worker = WorkerProcess(self.spec)
        try:
            info = await self.worker.start()
        except Unavailable as e:
            self.state, self.reason = "restarting", e.message
            return False
        self.state, self.reason = "ready", None
        log.info("model %s ready: %s worker pid %s, n_ctx %s, loaded in %.2f s", self.family,
                 self.variant.quantization, self.worker.pid, info.n_ctx, info.load_seconds)
        self.ready.set()
        return True

    async def _supervise(self) -> None:
        backoff = self.config.backoff_initial
        started = time.monotonic()
        while not self._stopping:
            if self.worker is None or self.worker.exited.is_set():
                if not await self._start_worker():
                    log.error("model %s: %s; retrying in %.1f s", self.family, self.reason, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.config.backoff_max)
                    continue
                started = time.monotonic()
            worker = self.worker
            assert worker is not None
            waits = [asyncio.create_task(worker.exited.wait()), asyncio.create_task(self.swaps.requested.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in waits:
                    t.cancel()
            if (target := self.swaps.take()) is not None:
                await swap_variant(self, target)
                continue
            self.ready.clear()
            if self._stopping:
                return
            self.restarts += 1
            self.state = "restarting"
            self.reason = f"worker exited with status {worker.proc and worker.proc.returncode}"
            if time.monotonic() - started > 60:
                backoff = self.config.backoff_initial
            log.error("model %s: %s; restarting in %.1f s", self.family, self.reason, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.backoff_max)

    async def _dispatch(self) -> None:
        while True:
            while not self.queue or self._paused:
                self._wake.clear()
                await self._wake.wait()
            # Wait for the worker before taking a box-wide slot, so a model that is restarting
            # never holds a slot another model could use.
            await self.ready.wait()
            await self.controls.acquire()
            try:
                if self.worker is None or self.worker.exited.is_set():
                    self.ready.clear()  # it just died: wait for the supervisor's restart
                    continue
                if not self.ready.is_set():  # a swap began while we waited for the slot
                    continue
                if not self.queue or self._paused:
                    continue
                job = self.queue.popleft()
                if job.cancelled:
                    job.finished.set()
                    continue
                if time.monotonic() > job.deadline:
                    job.events.put_nowait(p.Error(id=job.id, kind="deadline",
                                                  message="the request waited in the queue past its deadline"))
                    job.finished.set()
                    continue
                await self._run(job)
            finally:
                await self.controls.release()

    async def _run(self, job: Job) -> None:
        worker = self.worker
        assert worker is not None
        self.running = job
        job.digest = self.variant.digest
        self._idle.clear()
        t0 = time.monotonic()
        try:
            q = worker.open(job.id, job.request, timeout=max(0.0, job.deadline - time.monotonic()))
            while True:
                ev = await q.get()
                job.events.put_nowait(ev)
                if isinstance(ev, p.FINAL):
                    job.final = ev
                    break
        except WorkerCrashed:
            job.events.put_nowait(p.Crash(returncode=None, id=job.id))
        finally:
            worker.close(job.id)
            self.running = None
            self._idle.set()
            job.finished.set()
            self._durations.append(time.monotonic() - t0)

    # -- variant swaps -------------------------------------------------------------------

    def request_swap(self, variant: Variant, path: str, n_ctx: int, *, overlap: bool,
                     n_gpu_layers: int = 0) -> asyncio.Future[bool]:
        """Ask the supervisor to switch to `variant`; the future says whether it succeeded (runtime.swap)."""
        return self.swaps.request(SwapTarget(variant, path, n_ctx, n_gpu_layers, overlap))

    async def drain(self, seconds: float, reason: str) -> None:
        """Wait for the running job to finish; past `seconds`, cancel it with `reason` and wait again."""
        try:
            async with asyncio.timeout(seconds):
                await self._idle.wait()
            return
        except TimeoutError:
            pass
        job = self.running
        if job is not None and self.worker is not None:
            job.cancel_reason = reason
            self.cancel(job)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self._idle.wait()

    # -- requests -----------------------------------------------------------------------

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue's expected drain time, at least 1."""
        avg = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, math.ceil(avg * (len(self.queue) + 1)))

    def submit(self, request: p.Generate | p.Embed, timeout: float | None = None) -> Job:
        """Queue a request; raise QueueFull or Unavailable if it cannot be accepted."""
        if self.state == "broken":
            raise Unavailable(f"model {self.family} is broken: {self.reason}", code="model_broken")
        if self.state == "stopped":
            raise Unavailable(f"model {self.family} is not running")
        self.controls.check_admission()
        if len(self.queue) >= self.config.queue_size:
            raise QueueFull(f"model {self.family} has {len(self.queue)} requests waiting; try again later",
                            retry_after=self.retry_after())
        job = Job(request=request, deadline=time.monotonic() + (timeout or self.config.request_timeout))
        self.queue.append(job)
        self._wake.set()
        return job

    def pause_dispatch(self) -> None:
        """Start no more queued jobs (shutdown); the running one carries on."""
        self._paused = True

    def fail_queued(self, kind: str, message: str, retry_after: float | None = None) -> None:
        """Fail every job still waiting in the queue."""
        while self.queue:
            job = self.queue.popleft()
            job.events.put_nowait(p.Error(id=job.id, kind=kind, message=message, retry_after=retry_after))
            job.finished.set()

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

    async def _next_event(self, job: Job, client_gone: Callable[[], bool] | None) -> p.Event:
        """The job's next event; DeadlineExceeded past its deadline, ClientGone if the client left."""
        while True:
            remaining = job.deadline - time.monotonic()
            wait = min(remaining, CLIENT_POLL_SECONDS) if client_gone is not None else remaining
            try:
                async with asyncio.timeout(max(wait, 0)):
                    return await job.events.get()
            except TimeoutError:
                if time.monotonic() >= job.deadline:
                    raise DeadlineExceeded(f"the request did not finish within its deadline "
                                           f"of {self.config.request_timeout:.0f} s") from None
                if client_gone is not None and client_gone():
                    raise ClientGone from None

    async def stream(self, job: Job, client_gone: Callable[[], bool] | None = None) -> AsyncGenerator[p.Event]:
        """Yield the job's events until it ends, raising API errors; cancel it if abandoned.

        With `client_gone`, the client's connection is checked while no event arrives (a queued
        job waits silently): once it has gone the job leaves the queue (or stops) at once and
        `ClientGone` is raised, so a queued request whose client left is never dispatched.
        """
        finished = False
        try:
            while True:
                ev = await self._next_event(job, client_gone)
                if isinstance(ev, p.Done) and ev.finish_reason == "cancelled" and job.cancel_reason:
                    finished = True
                    raise Unavailable(f"{job.cancel_reason}; retry the request", code="interrupted",
                                      retry_after=5)
                if isinstance(ev, p.Done | p.Embedding):
                    finished = True
                    yield ev
                    return
                if isinstance(ev, p.Crash):
                    finished = True
                    raise WorkerCrashed(f"the worker serving {self.family} crashed (status "
                                        f"{ev.returncode}); it is being restarted, retry the request",
                                        retry_after=1)
                if isinstance(ev, p.Error):
                    finished = True
                    raise _worker_error(ev)
                yield ev
        finally:
            if not finished:
                self.cancel(job)

    def status(self) -> dict[str, Any]:
        """What this runner is doing, for /admin/status and `atoll status`."""
        info = self.worker.ready_info if self.worker and self.state == "ready" else None
        return {
            "model": self.family, "state": self.state, "reason": self.reason,
            "variant": self.variant.digest, "quantization": self.variant.quantization,
            "task": self.variant.task, "worker_pid": self.worker.pid if self.worker and self.state == "ready"
            else None, "n_ctx": info and info.n_ctx, "n_gpu_layers": self.spec.n_gpu_layers, "chat": info and info.chat,
            "queued": len(self.queue), "running": self.running is not None, "restarts": self.restarts,
            "variants": [{"digest": v.digest, "quantization": v.quantization, "broken": v.broken}
                         for v in self.variants],
        }


def _worker_error(ev: p.Error) -> Exception:
    """The API error for a worker's (or the runner's own) error event."""
    kind, msg, param = ev.kind, ev.message, ev.param
    if kind == "context_length":
        return ContextLengthExceeded(msg, param=param)
    if kind == "bad_request":
        return BadRequest(msg, param=param)
    if kind == "deadline":
        return DeadlineExceeded(msg)
    if kind == "governor":
        return Unavailable(msg, code="overloaded", retry_after=ev.retry_after)
    if kind == "shutting_down":
        return Unavailable(msg, code="shutting_down", retry_after=ev.retry_after)
    if kind == "unavailable":
        return Unavailable(msg, retry_after=ev.retry_after)
    # "internal": the worker logged the details; its message is a fixed sentence, never exception text.
    return Unavailable("the model failed on this request; the daemon log has the details",
                       code="inference_failed", retry_after=1)
