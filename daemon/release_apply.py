"""Bring the served models in line with the installed release: which families, which runners.

`ReleaseApplier.reload()` is the one way a release change reaches the service (after an
import, a rollback, or a change of `current` made from the shell). Reloads are
serialized: a second one waits for the first and then sees its runners, so two
concurrent reloads never start two runners for one family.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from daemon.config import Settings
from daemon.enforce import Limits, PolicyEnforcer
from daemon.governance import HardwareControl
from hardware.governor import State
from hardware.probe import Snapshot
from runtime.placement import decide
from runtime.runner import ModelRunner
from runtime.scheduler import Scheduler
from runtime.store import ModelStore, Variant
from sync.policy import Policy
from sync.state import Release, current_target, read_current_release

log = logging.getLogger(__name__)


class RunnerFactory:
    """Decides what to serve from a release and creates (not starts) the runners for it."""

    def __init__(self, store: ModelStore, scheduler: Scheduler, hardware: HardwareControl, limits: Limits) -> None:
        self.store, self.scheduler, self.hardware, self.limits = store, scheduler, hardware, limits

    def served_families(self, release: Release | None) -> dict[str, list[Variant]]:
        """The families to serve: local ones plus the release's, minus what the policy forbids."""
        fams = {f: vs for f, vs in self.store.families(release.families if release else None).items() if vs}
        allowed = self.limits.allowed_families
        if allowed is not None:
            for f in sorted(set(fams) - allowed):
                log.warning("model %s is not allowed by the site policy: not serving it", f)
            fams = {f: vs for f, vs in fams.items() if f in allowed}
        return fams

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


class ReleaseApplier:
    """Applies the current release: its policy (PolicyEnforcer), then the runners (RunnerFactory)."""

    def __init__(self, settings: Settings, store: ModelStore, scheduler: Scheduler, hardware: HardwareControl,
                 limits: Limits) -> None:
        self.settings, self.store, self.scheduler, self.hardware = settings, store, scheduler, hardware
        self.enforcer = PolicyEnforcer(settings, limits, scheduler, hardware)
        self.runners = RunnerFactory(store, scheduler, hardware, limits)
        #: the sequence `current` pointed to when last applied (None: no release)
        self.applied: int | None = current_target(settings.state_dir)
        self._lock = asyncio.Lock()
        #: Called with True when a release switch starts being applied and False when done (systemd notify).
        self.reload_listeners: list[Callable[[bool], None]] = []

    def release(self) -> Release | None:
        """The installed signed release, if any."""
        return read_current_release(self.settings.state_dir)

    def policy(self, release: Release | None) -> Policy | None:
        """The release's policy, if any."""
        return release.policy(self.store) if release else None

    def plan_at_start(self, snap: Snapshot | None) -> None:
        """Before serving: put the installed policy in force and create one runner per served family."""
        release = self.release()
        self.enforcer.apply(self.policy(release))
        self.runners.add_runners(self.runners.served_families(release), snap, State.NORMAL)

    async def reload(self) -> None:
        """Bring policy and served models in line with the current release (one reload at a time;
        listeners hear its start and end)."""
        async with self._lock:
            for listener in self.reload_listeners:
                listener(True)
            try:
                await self._reload()
            finally:
                for listener in self.reload_listeners:
                    listener(False)

    def _read(self) -> tuple[int | None, Policy | None, Release | None]:
        seen = current_target(self.settings.state_dir)
        release = self.release()
        return seen, self.policy(release), release

    async def _reload(self) -> None:
        seen, policy, release = await asyncio.to_thread(self._read)
        self.applied = seen
        self.enforcer.apply(policy)
        fams = await asyncio.to_thread(self.runners.served_families, release)
        runners = self.scheduler.runners
        for name in [n for n, r in runners.items() if n not in fams or r.state == "broken"]:
            log.info("model %s: no longer served", name)
            await runners.pop(name).stop()
        snap = self.hardware.governor.last_snapshot or await self.hardware.prober.snapshot()
        state = self.hardware.governor.state
        for name in set(fams) & set(runners):
            runners[name].variants = fams[name]
        await self.hardware.apply(snap, state)  # swaps the families already served, as the governor would
        new = {n: vs for n, vs in fams.items() if n not in runners}
        for r in self.runners.add_runners(new, snap, state):
            log.info("model %s: now served (%s)", r.family, r.variant.quantization)
            await r.start()
