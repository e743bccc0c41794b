"""The loading health check (daemon.smoke): one variant at a time, within the placement budget;
a variant that cannot fit is recorded, not a failure (issue 7 item 19). Real models, real workers;
only the RAM reading is set (this machine cannot be made smaller)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.smoke import SMOKE_N_CTX, ModelHealthCheck
from hardware.governor import State
from hardware.probe import Snapshot
from runtime.placement import PlacementPolicy, decide
from runtime.store import ModelStore, Variant
from sync.state import Release

GIB = 1 << 30


def _release(store: ModelStore, paths: list[Path], tmp_path: Path) -> Release:
    variants = []
    for p in paths:
        with p.open("rb") as f:
            digest, size = store.ingest(f)
        variants.append({"digest": digest, "size": size, "task": "generate"})
    return Release(sequence=1, version="1", bundle_digest="0" * 64, families={"sea": variants},
                   policy_digest="0" * 64, path=tmp_path, raw={})


def _need(store: ModelStore, v: Variant, policy: PlacementPolicy) -> int:
    snap = Snapshot(time=time.time(), ram_total_bytes=64 * GIB, ram_available_bytes=64 * GIB)
    d = decide({"sea": [v]}, snap, State.NORMAL, policy)["sea"]
    assert d.plan is not None and d.plan.chosen is not None and d.plan.chosen.estimate is not None
    return sum(dev.total_bytes for dev in d.plan.chosen.estimate.devices)


@pytest.mark.parametrize("room", ["both", "small-only", "none"])
async def test_loads_what_fits_one_at_a_time_and_records_the_rest(
        tmp_path: Path, smollm2_path: Path, smollm2_q4_0_path: Path, room: str) -> None:
    store = ModelStore(tmp_path / "state")
    release = _release(store, [smollm2_path, smollm2_q4_0_path], tmp_path)
    policy = PlacementPolicy(max_n_ctx=512, ram_headroom_bytes=256 << 20)
    variants = store.families(release.families)["sea"]
    needs = {v.digest: _need(store, v, dataclasses.replace(policy, max_n_ctx=SMOKE_N_CTX)) for v in variants}
    small, big = sorted(needs, key=needs.__getitem__)
    assert needs[small] < needs[big]
    available = {"both": needs[big] + (64 << 20), "small-only": (needs[small] + needs[big]) // 2,
                 "none": needs[small] // 2}[room] + policy.ram_headroom_bytes
    events: list[tuple[str, dict[str, Any]]] = []

    async def snapshot() -> Snapshot:
        return Snapshot(time=time.time(), ram_total_bytes=8 * GIB, ram_available_bytes=available)

    check = ModelHealthCheck(threads=1, load_timeout=60, placement=lambda: policy, snapshot=snapshot,
                             record=lambda e, d: events.append((e, d)))
    await check(release, store)
    loaded = [d["digest"] for e, d in events if e == "sync.health.loaded"]
    skipped = [d["digest"] for e, d in events if e == "sync.health.skipped"]
    want_loaded = {"both": {small, big}, "small-only": {small}, "none": set()}[room]
    assert set(loaded) == want_loaded and len(loaded) == len(want_loaded)
    assert set(skipped) == {small, big} - want_loaded
    assert all(d["reason"] for e, d in events if e == "sync.health.skipped")


def dataclass_ctx(policy: PlacementPolicy) -> PlacementPolicy:
    """The policy as the check uses it (smoke context)."""
    import dataclasses

    from daemon.smoke import SMOKE_N_CTX
    return dataclasses.replace(policy, max_n_ctx=SMOKE_N_CTX)
