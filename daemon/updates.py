"""The daemon's side of signed updates: imports (USB stick, admin upload, `atoll import`), the
health check that loads each new model in a fresh worker, and applying a release and its
policy to the running service without a restart.

Every import path ends in `sync.apply.SyncManager`; after it commits, `reload()` brings
the scheduler in line with the new release: new families start, families gone (or no
longer allowed by the policy) stop, changed ones swap variants like a governor swap.
An `atoll import` or `atoll rollback` run from the shell while the daemon runs is noticed
within a couple of seconds (the `current` link changes) and reloaded the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from daemon.config import Settings
from daemon.db import StateDB
from daemon.governance import HardwareControl
from daemon.tasks import Background
from hardware.governor import GovernorThresholds, State
from hardware.probe import Snapshot
from runtime.errors import Unavailable
from runtime.placement import decide
from runtime.runner import ModelRunner
from runtime.scheduler import Scheduler
from runtime.store import ModelStore, Variant
from runtime.worker_client import WorkerProcess, WorkerSpec
from sync.apply import ImportResult, SyncManager
from sync.errors import ImportFailed
from sync.health import DEFAULT_HEALTH_CHECKS
from sync.policy import Policy
from sync.state import Release, current_target
from sync.verify import SyncConfig
from sync.watch import UsbWatcher

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Limits:
    """Request limits in force: from the settings, tightened by the signed policy when one is installed."""

    max_tokens: int | None = None
    log_prompts: bool = False
    prompt_retention_days: int = 0
    allowed_families: frozenset[str] | None = None


def governor_thresholds(base: GovernorThresholds, policy: Policy | None) -> GovernorThresholds:
    """The settings' governor thresholds with the policy's thermal and memory limits applied."""
    if policy is None:
        return base
    total_mb = psutil.virtual_memory().total / 2**20
    return dataclasses.replace(
        base, cpu_constrained_c=policy.thermal_constrained_c, cpu_critical_c=policy.thermal_critical_c,
        gpu_constrained_c=policy.thermal_constrained_c, gpu_critical_c=policy.thermal_critical_c,
        ram_constrained_available_pct=min(99.0, 100.0 * policy.memory_constrained_free_mb / total_mb),
        ram_critical_available_pct=min(98.0, 100.0 * policy.memory_critical_free_mb / total_mb))


async def smoke_test(spec: WorkerSpec, family: str) -> None:
    """Load a model in a fresh worker and get an answer from it; raise ImportFailed if it cannot."""
    worker = WorkerProcess(spec)
    try:
        try:
            await worker.start()
        except Unavailable as e:
            raise ImportFailed(f"model {family}: {e.message}", code="health_check_failed") from None
        request = ({"op": "embed", "input": ["health check"]} if spec.embedding else
                   {"op": "generate", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        q = worker.open("smoke", request)
        while True:
            ev = await q.get()
            if ev["ev"] in ("done", "embedding"):
                return
            if ev["ev"] in ("error", "crash"):
                raise ImportFailed(f"model {family} failed its smoke prompt: {ev.get('message') or ev}",
                                   code="health_check_failed")
    finally:
        await worker.stop()


class Updates:
    """Imports, rollback, the USB watcher, and applying the current release to the service."""

    def __init__(self, settings: Settings, store: ModelStore, scheduler: Scheduler, hardware: HardwareControl,
                 db: StateDB, limits: Limits, version: str, background: Background) -> None:
        self.settings = settings
        self.store = store
        self.scheduler = scheduler
        self.hardware = hardware
        self.db = db
        self.limits = limits
        self.manager = SyncManager(settings.state_dir, SyncConfig(daemon_version=version),
                                   health_checks=(*DEFAULT_HEALTH_CHECKS, self._health_check), audit=self._audit)
        media = [Path(p) for p in settings.media_dirs.split(":") if p] if settings.usb_watch else []
        self.watcher = UsbWatcher(self._from_usb, media) if media else None
        self.last_result: dict[str, Any] | None = None
        self.last_error: dict[str, Any] | None = None
        self._seen_current = current_target(settings.state_dir)
        self._poll: asyncio.Task[None] | None = None
        self._background = background
        #: Called with True when a release switch starts being applied and False when done (systemd notify).
        self.reload_listeners: list[Callable[[bool], None]] = []

    # -- life cycle ------------------------------------------------------------------------

    def release(self) -> Release | None:
        """The installed signed release, if any."""
        return self.manager.current_release()

    def policy(self) -> Policy | None:
        """The installed release's policy, if any."""
        rel = self.release()
        return rel.policy(self.store) if rel else None

    async def start(self) -> None:
        """Start the USB watcher and the watch on `current`."""
        if self.watcher:
            await self.watcher.start()
        self._poll = asyncio.create_task(self._watch_current(), name="atoll-watch-current")

    async def stop(self) -> None:
        """Stop watching; an import in progress is cancelled by the runtime's shutdown."""
        if self._poll:
            self._poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll
        if self.watcher:
            await self.watcher.stop()

    def _audit(self, event: str, detail: dict[str, Any]) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # start-up recovery, before the loop runs
            self.db.audit("sync", event, _outcome(event), **detail)
            return
        self._background.spawn(self.db.run(self.db.audit, "sync", event, _outcome(event), **detail))

    # -- imports ---------------------------------------------------------------------------

    async def _health_check(self, release: Release, store: ModelStore) -> None:
        fams = store.families(release.families)
        for fam, variants in fams.items():
            if fam not in release.families:
                continue
            for v in variants:
                if v.broken:
                    raise ImportFailed(f"model {fam}: {v.broken}", code="health_check_failed")
                await smoke_test(WorkerSpec(model_path=str(store.blob_path(v.digest)), n_ctx=512,
                                            threads=self.settings.threads, embedding=v.task == "embed",
                                            load_timeout=self.settings.load_timeout), fam)

    async def run_import(self, path: str | os.PathLike[str], *, tar: bool = False) -> ImportResult:
        """Import a bundle (directory or tar) and apply it to the service."""
        try:
            result = await (self.manager.import_tar(path) if tar else self.manager.import_bundle(path))
        except Exception as e:
            self.last_error = {"path": str(path), "error": getattr(e, "message", str(e)),
                               "code": getattr(e, "code", "internal_error")}
            raise
        self.last_result, self.last_error = result.to_json(), None
        await self.reload()
        return result

    async def _from_usb(self, stick: Path) -> None:
        log.info("update bundle found on %s", stick)
        try:
            r = await self.run_import(stick)
            log.info("bundle from %s: %s (sequence %s)", stick, r.status, r.sequence)
        except Exception as e:
            log.error("bundle from %s refused or failed: %s", stick, getattr(e, "message", e))

    async def rollback(self) -> Release:
        """Return to the previous release and apply it."""
        rel = await self.manager.rollback()
        await self.reload()
        return rel

    async def _watch_current(self) -> None:
        last_purge = 0.0
        while True:
            await asyncio.sleep(2.0)
            try:
                seen = current_target(self.settings.state_dir)
                if seen != self._seen_current and not self.manager.busy:
                    log.info("release changed outside the daemon (now %s): reloading", seen)
                    await self.reload()
                loop_time = asyncio.get_running_loop().time()
                if self.limits.prompt_retention_days and loop_time - last_purge > 3600:
                    last_purge = loop_time
                    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=self.limits.prompt_retention_days)
                    n = await self.db.run(self.db.purge_prompt_text, cutoff.isoformat())
                    log.info("blanked the prompt text of %d usage records older than %d days", n,
                             self.limits.prompt_retention_days)
            except Exception:
                self._seen_current = current_target(self.settings.state_dir)  # report a failure once
                log.exception("applying the current release failed; still serving what was loaded")

    # -- applying a release ------------------------------------------------------------------

    def apply_policy(self, policy: Policy | None) -> None:
        """Put a policy's limits in force (None: the settings alone)."""
        s = self.settings
        self.limits.max_tokens = policy.max_tokens if policy else None
        self.limits.log_prompts = policy.log_prompts if policy else s.log_prompts
        self.limits.prompt_retention_days = policy.prompt_retention_days if policy else 0
        self.limits.allowed_families = frozenset(policy.allowed_families) if policy else None
        self.scheduler.config.queue_size = policy.queue_size if policy else s.queue_size
        n_ctx = min(s.n_ctx, policy.max_context) if policy else s.n_ctx
        self.scheduler.config.n_ctx = n_ctx
        self.hardware.policy = dataclasses.replace(self.hardware.policy, max_n_ctx=n_ctx)
        self.hardware.governor.machine.thresholds = governor_thresholds(s.governor, policy)

    def served_families(self, release: Release | None) -> dict[str, list[Variant]]:
        """The families to serve: local ones plus the release's, minus what the policy forbids."""
        fams = {f: vs for f, vs in self.store.families(release.families if release else None).items() if vs}
        allowed = self.limits.allowed_families
        if allowed is not None:
            for f in sorted(set(fams) - allowed):
                log.warning("model %s is not allowed by the site policy: not serving it", f)
            fams = {f: vs for f, vs in fams.items() if f in allowed}
        return fams

    async def reload(self) -> None:
        """Bring policy and served models in line with the current release (listeners hear start and end)."""
        for listener in self.reload_listeners:
            listener(True)
        try:
            await self._reload()
        finally:
            for listener in self.reload_listeners:
                listener(False)

    async def _reload(self) -> None:
        release = self.release()
        self._seen_current = current_target(self.settings.state_dir)
        self.apply_policy(release.policy(self.store) if release else None)
        fams = self.served_families(release)
        runners = self.scheduler.runners
        for name in [n for n, r in runners.items() if n not in fams or r.state == "broken"]:
            log.info("model %s: no longer served", name)
            await runners.pop(name).stop()
        snap = self.hardware.governor.last_snapshot or await self.hardware.prober.snapshot()
        state = self.hardware.governor.state
        for name in set(fams) & set(runners):
            runners[name].variants = fams[name]
        await self.hardware.apply(snap, state)  # swaps the families already served, as the governor would
        for r in self.add_runners({n: vs for n, vs in fams.items() if n not in runners}, snap, state):
            log.info("model %s: now served (%s)", r.family, r.variant.quantization)
            await r.start()

    def add_runners(self, fams: dict[str, list[Variant]], snap: Snapshot | None, state: State) -> list[ModelRunner]:
        """Create (not start) a runner per family, each on the variant placement chooses for now."""
        decisions = decide(fams, snap, state, self.hardware.policy)
        self.hardware.decisions.update(decisions)
        new = []
        for name, variants in fams.items():
            d = decisions[name]
            v, n_ctx = d.variant, d.n_ctx
            if v is None:
                healthy = [x for x in variants if not x.broken]
                v = min(healthy, key=lambda x: x.size) if healthy else variants[0]
                if healthy:
                    log.warning("model %s: %s; trying its smallest variant %s", name, d.why, v.quantization)
            r = ModelRunner(name, v, str(self.store.blob_path(v.digest)), self.scheduler.config,
                            self.scheduler.controls, n_ctx=n_ctx, variants=variants, n_gpu_layers=d.n_gpu_layers)
            self.scheduler.add(r)
            new.append(r)
        return new

    def status(self) -> dict[str, Any]:
        """What GET /admin/bundles shows."""
        rel = self.release()
        return {
            "current": None if rel is None else {"sequence": rel.sequence, "version": rel.version,
                                                 "families": sorted(rel.families)},
            "state": dataclasses.asdict(self.manager.state()),
            "progress": self.manager.progress.snapshot(),
            "last_result": self.last_result, "last_error": self.last_error,
            "media_dirs": [str(d) for d in self.watcher.media_dirs] if self.watcher else [],
        }


def _outcome(event: str) -> str:
    return "refused" if event.endswith(".rejected") else "failed" if event.endswith(".failed") else "ok"
