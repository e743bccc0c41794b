"""Wiring the hardware governor to the scheduler: what each state does to the served models.

- normal: every request admitted, no box-wide concurrency limit, best variants.
- constrained: at most `constrained_max_concurrent` generations at once across all
  models, and each family steps down to a smaller variant if one fits the reduced budget.
- critical: no new work (503 + Retry-After, code `overloaded`); queued requests are
  refused the same way; running ones get `critical_drain_seconds` to finish, then are
  cancelled (503 `interrupted`); each family drops to its smallest variant.
Recovery follows the governor's hysteresis and dwell. Every transition is logged with its
reason, and the state, reason, history and swaps are in GET /admin/hardware.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from typing import Any

from daemon.config import Settings
from hardware.estimate import estimate_memory
from hardware.governor import Governor, State, Transition
from hardware.probe import Prober, Snapshot, SnapshotSource, SystemSource
from hardware.replay import open_replay
from runtime.placement import Decision, PlacementPolicy, decide
from runtime.runner import ModelRunner
from runtime.scheduler import Scheduler
from runtime.store import ModelStore, Variant

log = logging.getLogger(__name__)

#: Runner states with a worker on its way: its RAM is not counted as reclaimable yet, so it is planned once ready.
_WARMING = ("loading", "restarting")


def make_source(settings: Settings) -> SnapshotSource:
    """The machine's sensors, or a recorded timeline when --sensor-replay is set."""
    if settings.sensor_replay:
        return open_replay(settings.sensor_replay)
    return SystemSource(str(settings.state_dir))


def placement_policy(settings: Settings) -> PlacementPolicy:
    """Variant-choice knobs from the settings."""
    return PlacementPolicy(max_n_ctx=settings.n_ctx, ram_headroom_bytes=settings.ram_headroom_mb << 20,
                           vram_headroom_bytes=settings.vram_headroom_mb << 20,
                           constrained_budget_fraction=settings.constrained_budget_fraction)


def footprint(variant: Variant, n_ctx: int, n_gpu_layers: int = 0) -> int:
    """Estimated RAM a variant takes loaded at n_ctx with n_gpu_layers offloaded (0 if its header is unknown)."""
    if variant.info is None:
        return 0
    return estimate_memory(variant.info, n_ctx, n_gpu_layers=n_gpu_layers).device("cpu").total_bytes


class HardwareControl:
    """Runs the governor and applies its states and the variant choice to the scheduler."""

    def __init__(self, settings: Settings, store: ModelStore, scheduler: Scheduler, prober: Prober) -> None:
        self.settings = settings
        self.store = store
        self.scheduler = scheduler
        self.prober = prober
        self.policy = placement_policy(settings)
        self.governor = Governor(prober, settings.governor, interval_s=settings.governor_interval)
        self.governor.on_transition(self._on_transition)
        self.decisions: dict[str, Decision] = {}
        self.reason = "no threshold crossed since start"
        self.swap_latencies: list[dict[str, Any]] = []
        self._drain_task: asyncio.Task[None] | None = None
        self._replan_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the governor loop (its first tick runs at once)."""
        await self.governor.start()

    async def stop(self) -> None:
        """Stop the governor loop and release the sensors."""
        await self.governor.stop()
        for task in (self._drain_task, self._replan_task):
            if task:
                task.cancel()
        self.prober.close()

    async def _on_transition(self, tr: Transition, snap: Snapshot) -> None:
        state = tr.to_state
        self.reason = tr.reason
        log.warning("governor: %s -> %s: %s", tr.from_state.name.lower(), state.name.lower(), tr.reason)
        controls = self.scheduler.controls
        if state == State.CRITICAL:
            retry = max(5.0, self.settings.governor.min_dwell_s)
            msg = f"the box is critical ({tr.reason}); not accepting new requests"
            controls.close(msg, retry)
            for r in self.scheduler.runners.values():
                r.fail_queued("governor", msg, retry)
            self._drain_task = asyncio.create_task(self._drain_all(tr.reason))
        else:
            controls.open()
            await controls.set_limit(self.settings.constrained_max_concurrent if state == State.CONSTRAINED else 0)
        await self.apply(snap, state, time.monotonic())

    async def _drain_all(self, reason: str) -> None:
        await asyncio.gather(*(r.drain(self.settings.critical_drain_seconds, f"the box is critical ({reason})")
                               for r in self.scheduler.runners.values()))

    async def apply(self, snap: Snapshot | None, state: State, t_change: float | None = None) -> None:
        """Choose each family's variant for this state and start the swaps that are needed.

        A family whose worker is still loading (or restarting) is not swapped now: what it will give
        back is not counted yet, so a stop-first swap could look impossible. Once it is ready the
        plan is made again from the governor's latest snapshot and state.
        """
        runners = self.scheduler.runners
        if any(r.state in _WARMING for r in runners.values()) and (
                self._replan_task is None or self._replan_task.done()):
            self._replan_task = asyncio.create_task(self._replan_when_ready(t_change), name="replan-when-ready")
        loaded = sum(footprint(r.variant, r.spec.n_ctx, r.spec.n_gpu_layers) for r in runners.values()
                     if r.state == "ready")
        self.decisions = decide({n: r.variants for n, r in runners.items()}, snap, state, self.policy, loaded)
        for fam, d in self.decisions.items():
            r = runners[fam]
            if r.state in _WARMING:
                continue
            if d.variant is None or (d.variant.digest, d.n_ctx, d.n_gpu_layers) == (
                    r.variant.digest, r.spec.n_ctx, r.spec.n_gpu_layers):
                continue
            if not await asyncio.to_thread(self._still_good, d.variant):  # re-reads the GGUF header
                continue
            overlap = self._both_fit(snap, r, d)
            fut = r.request_swap(d.variant, str(self.store.blob_path(d.variant.digest)), d.n_ctx, overlap=overlap,
                                 n_gpu_layers=d.n_gpu_layers)
            log.info("model %s: switching %s -> %s (n_ctx %d, %s): %s", fam, r.variant.quantization,
                     d.variant.quantization, d.n_ctx, "load first" if overlap else "stop first", d.why)
            if t_change is not None:
                fut.add_done_callback(functools.partial(self._swap_done, fam=fam, state=state, t_change=t_change))

    async def _replan_when_ready(self, t_change: float | None) -> None:
        while warming := [r for r in self.scheduler.runners.values() if r.state in _WARMING]:
            waits = [asyncio.create_task(r.ready.wait()) for r in warming]
            try:  # the timeout re-reads the runners: one may be removed by a release switch while it loads
                await asyncio.wait(waits, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in waits:
                    t.cancel()
        log.info("every model is loaded: planning the variants again for the %s state",
                 self.governor.state.name.lower())
        await self.apply(self.governor.last_snapshot, self.governor.state, t_change)

    def _swap_done(self, fut: asyncio.Future[bool], *, fam: str, state: State, t_change: float) -> None:
        if fut.cancelled():
            return
        self.swap_latencies.append({"model": fam, "state": state.name.lower(), "ok": fut.result(),
                                    "seconds_from_state_change": round(time.monotonic() - t_change, 3)})
        del self.swap_latencies[:-50]

    def _still_good(self, v: Variant) -> bool:
        """Re-check the target's blob now: a file that went missing or corrupt is marked broken."""
        fresh = self.store.inspect(dataclasses.replace(v, info=None, broken=None))
        if fresh.broken:
            v.broken = fresh.broken
            log.error("model %s: variant sha256-%s is broken at swap time (%s); staying on the current variant",
                      v.family, v.digest[:12], fresh.broken)
            return False
        return True

    def _both_fit(self, snap: Snapshot | None, r: ModelRunner, d: Decision) -> bool:
        if snap is None or snap.ram_available_bytes is None or d.variant is None:
            return False
        need = footprint(d.variant, d.n_ctx, d.n_gpu_layers)
        return need + self.policy.ram_headroom_bytes <= snap.ram_available_bytes

    def status(self) -> dict[str, Any]:
        """Everything GET /admin/hardware shows."""
        c = self.scheduler.controls
        return {
            "governor": {**self.governor.status(), "reason": self.reason,
                         "state": self.governor.state.name.lower()},
            "admitting": c.admitting, "concurrency_limit": c.limit or None,
            "sensor_source": "replay:" + self.settings.sensor_replay if self.settings.sensor_replay else "system",
            "decisions": {f: d.to_json() for f, d in self.decisions.items()},
            "swaps": {n: [s.to_json() for s in r.swaps] for n, r in self.scheduler.runners.items()},
            "swap_latencies": self.swap_latencies,
        }
