"""The import health check that loads each new model: one implementation for the daemon
and `atoll import`.

After the built-in checks (policy parses, GGUF headers complete), every variant of every
family the release ships is, one at a time: planned against the box's placement budget
as it is now (`runtime.placement.decide` on a fresh sensor snapshot, so models already
serving count against it); if it fits, loaded in a fresh worker with the configured
threads at a small context and asked for a few tokens (or one embedding). A variant that
cannot fit this box is not loaded and not a failure: a bundle may carry several
quantizations for "pick what fits"; it is logged and recorded (`sync.health.skipped`)
and placement never chooses it here. A variant that fits but fails to load or answer
fails the import.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from daemon.config import Settings
from daemon.governance import make_source, placement_policy
from hardware.governor import State
from hardware.probe import Prober, Snapshot
from runtime import protocol as p
from runtime.errors import Unavailable
from runtime.placement import PlacementPolicy, decide
from runtime.store import ModelStore
from runtime.worker_client import WorkerProcess, WorkerSpec
from sync.errors import ImportFailed
from sync.health import HealthCheck
from sync.state import Release

log = logging.getLogger(__name__)

SMOKE_N_CTX = 512
Record = Callable[[str, dict[str, Any]], None]


async def smoke_test(spec: WorkerSpec, family: str) -> None:
    """Load a model in a fresh worker and get an answer from it; raise ImportFailed if it cannot."""
    worker = WorkerProcess(spec)
    try:
        try:
            await worker.start()
        except Unavailable as e:
            raise ImportFailed(f"model {family}: {e.message}", code="health_check_failed") from None
        request = (p.Embed(input=["health check"]) if spec.embedding else
                   p.Generate(prompt="Hello", max_tokens=4, temperature=0))
        q = worker.open("smoke", request)
        while True:
            ev = await q.get()
            if isinstance(ev, p.Done | p.Embedding):
                return
            if isinstance(ev, p.Error | p.Crash):
                raise ImportFailed(f"model {family} failed its smoke prompt: "
                                   f"{ev.message if isinstance(ev, p.Error) else ev}", code="health_check_failed")
    finally:
        await worker.stop()


@dataclasses.dataclass
class ModelHealthCheck:
    """The loading health check (see the module docstring); a `sync.health.HealthCheck`."""

    threads: int
    load_timeout: float
    placement: Callable[[], PlacementPolicy]
    snapshot: Callable[[], Awaitable[Snapshot | None]]
    record: Record | None = None

    async def __call__(self, release: Release, store: ModelStore) -> None:
        """Load each variant of the release's families that fits, one at a time."""
        fams = await asyncio.to_thread(store.families, release.families)
        for fam in sorted(release.families):
            for v in fams.get(fam, []):
                if v.broken:
                    raise ImportFailed(f"model {fam}: {v.broken}", code="health_check_failed")
                policy = dataclasses.replace(self.placement(), max_n_ctx=SMOKE_N_CTX)
                d = decide({fam: [v]}, await self.snapshot(), State.NORMAL, policy)[fam]
                detail = {"family": fam, "digest": v.digest, "quantization": v.quantization}
                if d.variant is None:
                    log.warning("model %s variant %s (sha256-%s) does not fit this box now (%s): not loaded by "
                                "the health check", fam, v.quantization, v.digest[:12], d.why)
                    self._record("sync.health.skipped", {**detail, "reason": d.why})
                    continue
                await smoke_test(WorkerSpec(model_path=str(store.blob_path(v.digest)), n_ctx=SMOKE_N_CTX,
                                            threads=self.threads, embedding=v.task == "embed",
                                            load_timeout=self.load_timeout), fam)
                self._record("sync.health.loaded", detail)

    def _record(self, event: str, detail: dict[str, Any]) -> None:
        if self.record is not None:
            self.record(event, detail)


def cli_health_check(settings: Settings) -> HealthCheck:
    """The check as `atoll import` runs it: the box's own sensors and the settings' threads."""
    async def snapshot() -> Snapshot | None:
        prober = Prober(make_source(settings))
        try:
            return await prober.snapshot()
        finally:
            prober.close()

    return ModelHealthCheck(threads=settings.threads, load_timeout=settings.load_timeout,
                            placement=lambda: placement_policy(settings), snapshot=snapshot)
