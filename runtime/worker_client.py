"""The daemon's side of one worker process: spawn it, talk the typed protocol to it, notice its death."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from runtime import protocol as p
from runtime.errors import Unavailable, WorkerCrashed
from runtime.lifeline import PARENT_ENV

log = logging.getLogger(__name__)

#: Longest event line accepted from a worker (embeddings of many inputs are large).
LINE_LIMIT = 64 * 1024 * 1024
#: Seconds a worker has to answer a stats query (its reader thread answers at once).
STATS_TIMEOUT = 10.0
#: Where the `runtime` package lives, so the worker imports the same code as the daemon.
_SOURCE_ROOT = str(Path(__file__).resolve().parent.parent)


@dataclass(frozen=True)
class WorkerSpec:
    """How to start a worker for one model variant."""

    model_path: str
    n_ctx: int = 2048
    threads: int = 2
    n_batch: int = 512
    n_gpu_layers: int = 0
    embedding: bool = False
    pooling: str = "model"
    load_timeout: float = 120.0

    def argv(self) -> list[str]:
        """Command line of the worker process."""
        cmd = [sys.executable, "-m", "runtime.worker", "--model", self.model_path,
               "--n-ctx", str(self.n_ctx), "--threads", str(self.threads), "--n-batch", str(self.n_batch),
               "--n-gpu-layers", str(self.n_gpu_layers)]
        if self.embedding:
            cmd += ["--embedding", "--pooling", self.pooling]
        return cmd


class WorkerProcess:
    """One running worker; routes its events to per-request queues by id."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.proc: asyncio.subprocess.Process | None = None
        self.ready_info: p.Ready | None = None
        self._queues: dict[str, asyncio.Queue[p.Event]] = {}
        self._stats_ids = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None
        self._stderr_task: asyncio.Task[None] | None = None
        self.exited = asyncio.Event()

    @property
    def pid(self) -> int | None:
        """Process id, if started."""
        return self.proc.pid if self.proc else None

    async def start(self) -> p.Ready:
        """Spawn the worker and wait until its model is loaded; return its ready event."""
        env = dict(os.environ)
        env["PYTHONPATH"] = _SOURCE_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):  # only the daemon talks to systemd
            env.pop(name, None)
        env[PARENT_ENV] = str(os.getpid())  # the worker exits when this process dies (runtime.lifeline)
        self.proc = await asyncio.create_subprocess_exec(
            *self.spec.argv(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, limit=LINE_LIMIT, env=env, start_new_session=True)
        self._stderr_task = asyncio.create_task(self._pump_stderr())
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(self.spec.load_timeout):
                line = await self.proc.stdout.readline()
        except TimeoutError:
            await self.kill()
            raise Unavailable(f"model {os.path.basename(self.spec.model_path)} did not load within "
                              f"{self.spec.load_timeout:.0f} s") from None
        if not line:
            rc = await self.proc.wait()
            self.exited.set()
            raise Unavailable(f"worker exited with status {rc} while loading "
                              f"{os.path.basename(self.spec.model_path)}")
        try:
            ready = p.decode_event(line)
        except p.ProtocolError as e:
            await self.kill()
            raise Unavailable(f"worker for {os.path.basename(self.spec.model_path)} answered with an invalid "
                              f"ready line ({e})") from None
        if not isinstance(ready, p.Ready):
            await self.kill()
            raise Unavailable(f"worker for {os.path.basename(self.spec.model_path)} did not announce readiness")
        self.ready_info = ready
        self._reader = asyncio.create_task(self._read())
        return self.ready_info

    async def _pump_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            text = raw.decode("utf-8", "replace").rstrip()
            if text:
                log.info("%s", text)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            async for line in self.proc.stdout:
                ev = p.decode_event(line)
                q = self._queues.get(getattr(ev, "id", ""))
                if q is not None:
                    q.put_nowait(ev)
        except (p.ProtocolError, ValueError, asyncio.LimitOverrunError) as e:
            log.error("worker %s sent a bad event line (%s); stopping it", self.pid, e)
            await self.kill()
        rc = await self.proc.wait()
        self.exited.set()
        if self._queues:
            log.error("worker %s (%s) died with status %s during %d request(s)", self.pid,
                      os.path.basename(self.spec.model_path), rc, len(self._queues))
        crash = p.Crash(returncode=rc)
        for q in self._queues.values():
            q.put_nowait(crash)

    def open(self, rid: str, request: p.Generate | p.Embed,
             timeout: float | None = None) -> asyncio.Queue[p.Event]:
        """Send a request (with the seconds left before its deadline); return the queue its events
        arrive on (a `Crash` event if the worker dies)."""
        if self.proc is None or self.proc.stdin is None or self.exited.is_set():
            raise WorkerCrashed("the model's worker is not running; it is being restarted")
        q: asyncio.Queue[p.Event] = asyncio.Queue()
        self._queues[rid] = q
        self.proc.stdin.write(p.encode(dataclasses.replace(request, id=rid, timeout=timeout)))
        return q

    async def stats(self) -> p.Stats:
        """The worker's counters (requests received, prompts processed, prompt tokens)."""
        rid = f"stats-{next(self._stats_ids)}"
        if self.proc is None or self.proc.stdin is None or self.exited.is_set():
            raise WorkerCrashed("the model's worker is not running")
        q: asyncio.Queue[p.Event] = asyncio.Queue()
        self._queues[rid] = q
        try:
            self.proc.stdin.write(p.encode(p.StatsQuery(id=rid)))
            async with asyncio.timeout(STATS_TIMEOUT):
                ev = await q.get()
        finally:
            self._queues.pop(rid, None)
        if not isinstance(ev, p.Stats):
            raise WorkerCrashed("the model's worker died before answering")
        return ev

    def close(self, rid: str) -> None:
        """Forget a finished request's queue."""
        self._queues.pop(rid, None)

    def cancel(self, rid: str) -> None:
        """Ask the worker to stop generating for this request."""
        if self.proc and self.proc.stdin and not self.exited.is_set() and rid in self._queues:
            self.proc.stdin.write(p.encode(p.Cancel(id=rid)))

    async def kill(self) -> None:
        """SIGKILL the worker."""
        if self.proc and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)

    async def stop(self, grace: float = 5.0) -> None:
        """Close its stdin so it exits; kill it if it does not within `grace` seconds."""
        if self.proc is None:
            return
        if self.proc.stdin and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            async with asyncio.timeout(grace):
                await self.proc.wait()
        except TimeoutError:
            await self.kill()
            await self.proc.wait()
        for t in (self._reader, self._stderr_task):
            if t:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        self.exited.set()
