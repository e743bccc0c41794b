"""Which variant of each model family runs now, given the box's budget and the governor's state.

Rules (documented in the README):
- normal: the best-quality variant that fits the memory budget, at the largest context
  the policy allows (hardware.fit.choose_variant);
- constrained: the budget shrinks to `constrained_budget_fraction` of what is available,
  and the family steps down to a variant smaller than its normal choice when one fits
  (a smaller model runs cooler and leaves memory); if none is smaller it stays;
- critical: the smallest variant that fits; admission is closed by the daemon meanwhile.
Families are planned in name order against what remains of the budget, so two models
never both claim the same memory. When the budget is unknown (no RAM reading), the
first healthy variant runs at the configured context.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from hardware.estimate import model_shape
from hardware.fit import Budget, ContextPolicy, Plan, budget_from_snapshot, choose_variant
from hardware.governor import State
from hardware.probe import Snapshot
from runtime.store import Variant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlacementPolicy:
    """Knobs for variant choice, from the daemon's settings."""

    max_n_ctx: int = 2048
    ram_headroom_bytes: int = 1 << 30
    vram_headroom_bytes: int = 512 << 20
    constrained_budget_fraction: float = 0.7


@dataclass(frozen=True)
class Decision:
    """What one family should run: a variant at a context size (variant None: nothing fits)."""

    family: str
    variant: Variant | None
    n_ctx: int
    why: str
    plan: Plan | None = None
    n_gpu_layers: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON-able form for /admin/hardware and `atoll models plan --json`."""
        return {"family": self.family, "variant": self.variant.digest if self.variant else None,
                "quantization": self.variant.quantization if self.variant else None, "n_ctx": self.n_ctx,
                "n_gpu_layers": self.n_gpu_layers, "why": self.why, "plan": self.plan.to_json() if self.plan else None}


def _healthy(variants: list[Variant]) -> list[Variant]:
    """Variants that are readable and whose header has what the memory estimate needs."""
    out = []
    for v in variants:
        if v.broken or v.info is None:
            continue
        try:
            model_shape(v.info)
        except ValueError as e:
            v.broken = f"cannot plan it: {e}"
            log.warning("model %s variant sha256-%s: %s", v.family, v.digest[:12], v.broken)
            continue
        out.append(v)
    return out


def _shrink(budget: Budget, used: dict[str, int]) -> Budget:
    return Budget(tuple(dataclasses.replace(d, available_bytes=max(0, d.available_bytes - used.get(d.device, 0)))
                        for d in budget.devices))


def decide(families: dict[str, list[Variant]], snapshot: Snapshot | None, state: State,
           policy: PlacementPolicy, reclaimable_bytes: int = 0) -> dict[str, Decision]:
    """Plan every family for this snapshot and governor state."""
    ctx = ContextPolicy(max_n_ctx=policy.max_n_ctx, min_n_ctx=min(512, policy.max_n_ctx))
    out: dict[str, Decision] = {}
    ram = snapshot.ram_available_bytes if snapshot else None
    if ram is None:
        for fam, variants in sorted(families.items()):
            ok = _healthy(variants)
            out[fam] = Decision(fam, ok[0] if ok else None, policy.max_n_ctx,
                                "memory budget unknown: first healthy variant" if ok else "no healthy variant")
        return out
    assert snapshot is not None
    fraction = policy.constrained_budget_fraction if state >= State.CONSTRAINED else 1.0
    budget = budget_from_snapshot(snapshot, ram_headroom_bytes=policy.ram_headroom_bytes,
                                  vram_headroom_bytes=policy.vram_headroom_bytes,
                                  reclaimable_bytes=reclaimable_bytes, fraction=fraction)
    assert budget is not None  # RAM is known here
    used: dict[str, int] = {}
    for fam, variants in sorted(families.items()):
        ok = _healthy(variants)
        if not ok:
            out[fam] = Decision(fam, None, policy.max_n_ctx, "no healthy variant")
            continue
        remaining = _shrink(budget, used)
        by_digest = {v.digest: v for v in ok}
        cands = [(v.digest, v.info) for v in ok if v.info is not None]
        plan = choose_variant(cands, remaining, ctx)
        why = "best quality that fits"
        if state == State.CONSTRAINED and plan.chosen is not None:
            normal = by_digest[plan.chosen.id]
            assert normal.info is not None
            smaller = [(d, i) for d, i in cands if i.weights_bytes < normal.info.weights_bytes]
            if smaller:
                sub = choose_variant(smaller, remaining, ctx)
                if sub.chosen is not None:
                    plan, why = sub, "constrained: best smaller variant that fits"
                else:
                    why = "constrained: no smaller variant fits; staying"
            else:
                why = "constrained: no smaller variant exists"
        elif state == State.CRITICAL:
            fitting = [c for c in plan.candidates if c.fits]
            if fitting:
                smallest = min(fitting, key=lambda c: by_digest[c.id].size)
                plan = Plan(smallest, plan.candidates, plan.budget)
                why = "critical: smallest variant that fits"
        chosen = plan.chosen
        if chosen is None:
            out[fam] = Decision(fam, None, policy.max_n_ctx, "no variant fits the memory budget", plan)
            continue
        if chosen.estimate is not None:
            for d in chosen.estimate.devices:
                used[d.device] = used.get(d.device, 0) + d.total_bytes
        out[fam] = Decision(fam, by_digest[chosen.id], chosen.n_ctx or policy.max_n_ctx, why, plan,
                            chosen.n_gpu_layers or 0)
    return out
