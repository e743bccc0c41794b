"""Which variant of a model to run within a memory budget, and why.

Inputs are plain: candidate variants as ``(id, GGUFInfo)`` and a :class:`Budget` (memory
available per device minus a configured headroom). The choice, in order of priority:

1. the best quantization (:data:`QUALITY_ORDER`) that fits at all (at ``policy.min_n_ctx``);
2. for it, the largest context from ``policy.candidates`` up to ``policy.max_n_ctx`` (and the
   model's trained context) that fits;
3. at that context, the most layers offloaded to the GPU(s) that still fit.

Every candidate gets human-readable reasons (fits or not, and why), for ``atoll models plan``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hardware.estimate import MemoryEstimate, estimate_memory
from hardware.gguf import GGUFInfo
from hardware.probe import Snapshot

log = logging.getLogger(__name__)

#: Quantization types from best to worst quality; types on one line of a tuple tie.
QUALITY_ORDER: tuple[tuple[str, ...], ...] = (
    ("F32",), ("BF16", "F16"), ("Q8_0",), ("Q6_K",), ("Q5_K_M",), ("Q5_K_S", "Q5_1"), ("Q5_0",),
    ("Q4_K_M",), ("Q4_K_S", "Q4_1"), ("IQ4_XS", "IQ4_NL", "MXFP4_MOE"), ("Q4_0",), ("Q3_K_L",),
    ("Q3_K_M", "IQ3_M"), ("IQ3_S", "Q3_K_S"), ("IQ3_XS",), ("IQ3_XXS",), ("Q2_K",), ("Q2_K_S", "IQ2_M"),
    ("IQ2_S",), ("IQ2_XS",), ("IQ2_XXS",), ("TQ2_0",), ("IQ1_M", "TQ1_0"), ("IQ1_S",),
)
_RANKS = {q: i for i, tier in enumerate(QUALITY_ORDER) for q in tier}

MiB = 1 << 20
GiB = 1 << 30


def quality_rank(quantization: str) -> int:
    """Rank of a quantization type: 0 is best; unknown types rank below every known one."""
    return _RANKS.get(quantization.upper(), len(QUALITY_ORDER))


def _fmt(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


@dataclass(frozen=True)
class DeviceBudget:
    """Memory one device ('cpu', 'gpu0', ...) can give a model."""

    device: str
    available_bytes: int
    headroom_bytes: int = 0

    @property
    def usable_bytes(self) -> int:
        """Available minus headroom, never negative."""
        return max(0, self.available_bytes - self.headroom_bytes)

    def describe(self) -> str:
        """e.g. 'cpu: 1.50 GiB usable (2.00 GiB available - 512 MiB headroom)'."""
        return (f"{self.device}: {_fmt(self.usable_bytes)} usable ({_fmt(self.available_bytes)} available"
                f" - {_fmt(self.headroom_bytes)} headroom)")


@dataclass(frozen=True)
class Budget:
    """Per-device budgets; the CPU entry is required."""

    devices: tuple[DeviceBudget, ...]

    def __post_init__(self) -> None:
        if not any(d.device == "cpu" for d in self.devices):
            raise ValueError("a budget needs a 'cpu' entry")

    @property
    def gpus(self) -> tuple[DeviceBudget, ...]:
        """The GPU entries, in index order."""
        return tuple(d for d in self.devices if d.device != "cpu")

    def usable(self, device: str) -> int:
        """Usable bytes on `device` (0 for a device not in the budget)."""
        return next((d.usable_bytes for d in self.devices if d.device == device), 0)


def budget_from_snapshot(snapshot: Snapshot, *, ram_headroom_bytes: int = 1 * GiB,
                         vram_headroom_bytes: int = 512 * MiB, reclaimable_bytes: int = 0,
                         fraction: float = 1.0) -> Budget | None:
    """Budget from a snapshot, or None when available RAM is unknown.

    `reclaimable_bytes` is what the currently loaded variant holds and would give back;
    `fraction` scales what is available (e.g. 0.7 while the governor is constrained).
    GPUs whose free memory is unknown are left out.
    """
    if snapshot.ram_available_bytes is None:
        return None
    devices = [DeviceBudget("cpu", int((snapshot.ram_available_bytes + reclaimable_bytes) * fraction),
                            ram_headroom_bytes)]
    for g in snapshot.gpus or ():
        if g.memory_free_bytes is not None:
            devices.append(DeviceBudget(f"gpu{g.index}", int(g.memory_free_bytes * fraction),
                                        vram_headroom_bytes))
    return Budget(tuple(devices))


@dataclass(frozen=True)
class ContextPolicy:
    """Which context sizes are allowed, largest first."""

    max_n_ctx: int = 8192
    min_n_ctx: int = 512
    candidates: tuple[int, ...] = (131072, 65536, 32768, 16384, 8192, 4096, 2048, 1024, 512)

    def sizes_for(self, info: GGUFInfo) -> list[int]:
        """Allowed sizes for this model, largest first (capped by its trained context)."""
        cap = min(self.max_n_ctx, info.context_length or self.max_n_ctx)
        sizes = sorted({n for n in (*self.candidates, cap) if self.min_n_ctx <= n <= cap}, reverse=True)
        return sizes


@dataclass(frozen=True)
class CandidatePlan:
    """What the planner found for one candidate variant."""

    id: str
    quantization: str
    rank: int
    fits: bool
    n_ctx: int | None = None
    n_gpu_layers: int | None = None
    estimate: MemoryEstimate | None = field(default=None, repr=False)
    reasons: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "id": self.id, "quantization": self.quantization, "fits": self.fits, "n_ctx": self.n_ctx,
            "n_gpu_layers": self.n_gpu_layers, "reasons": list(self.reasons),
            "devices": None if self.estimate is None else {
                d.device: d.total_bytes for d in self.estimate.devices},
        }


@dataclass(frozen=True)
class Plan:
    """The chosen variant (or None) and the verdict on every candidate, best quality first."""

    chosen: CandidatePlan | None
    candidates: tuple[CandidatePlan, ...]
    budget: Budget

    def explain(self) -> str:
        """Human-readable plan, one line per candidate."""
        lines = ["budget: " + "; ".join(d.describe() for d in self.budget.devices)]
        for c in self.candidates:
            mark = "*" if self.chosen is not None and c.id == self.chosen.id else ("+" if c.fits else "-")
            lines.append(f"{mark} {c.id} [{c.quantization}]: " + "; ".join(c.reasons))
        if self.chosen is None:
            lines.append("no candidate fits the budget")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"chosen": self.chosen.id if self.chosen else None,
                "budget": {d.device: {"available": d.available_bytes, "headroom": d.headroom_bytes}
                           for d in self.budget.devices},
                "candidates": [c.to_json() for c in self.candidates]}


def _fits(est: MemoryEstimate, budget: Budget) -> list[str]:
    """Devices that do not fit, as reasons (empty list = fits)."""
    return [f"needs {_fmt(d.total_bytes)} on {d.device}, {_fmt(budget.usable(d.device))} usable"
            for d in est.devices if d.total_bytes > budget.usable(d.device)]


def plan_candidate(cid: str, info: GGUFInfo, budget: Budget, policy: ContextPolicy,
                   **estimate_kw: Any) -> CandidatePlan:
    """Largest context, then most GPU layers, at which `info` fits `budget` (or why it cannot)."""
    quant = info.quantization
    rank = quality_rank(quant)
    sizes = policy.sizes_for(info)
    if not sizes:
        return CandidatePlan(cid, quant, rank, False, reasons=(
            f"trained context {info.context_length} is below the policy minimum {policy.min_n_ctx}",))
    gpus = budget.gpus
    n_layers = info.n_layers or 0
    split = tuple(max(g.usable_bytes, 1) for g in gpus) or (1.0,)
    gpu_options = list(range(n_layers + 1, -1, -1)) if gpus else [0]
    first_miss: list[str] = []
    for n_ctx in sizes:
        for ngl in gpu_options:
            est = estimate_memory(info, n_ctx, n_gpu_layers=ngl, gpu_split=split, **estimate_kw)
            miss = _fits(est, budget)
            if not miss:
                where = ", ".join(f"{d.device} {_fmt(d.total_bytes)} of {_fmt(budget.usable(d.device))}"
                                  for d in est.devices)
                on_gpu = f" with {ngl}/{n_layers + 1} layers on GPU" if gpus else ""
                reasons = [f"fits at n_ctx {n_ctx}{on_gpu} ({where})"]
                if n_ctx < sizes[0] and first_miss:
                    reasons.append(f"n_ctx {sizes[0]} would not fit: {first_miss[0]}")
                return CandidatePlan(cid, quant, rank, True, n_ctx, ngl, est, tuple(reasons))
            if not first_miss:
                first_miss = miss
        # nothing fits at this context size: try a smaller one
    cpu_only = estimate_memory(info, sizes[-1], **estimate_kw)
    why = [("CPU only: " if gpus else "") + "; ".join(_fits(cpu_only, budget))]
    if gpus:
        full = estimate_memory(info, sizes[-1], n_gpu_layers=gpu_options[0], gpu_split=split, **estimate_kw)
        why.append("all layers on GPU: " + "; ".join(_fits(full, budget)))
    return CandidatePlan(cid, quant, rank, False, estimate=cpu_only, reasons=(
        f"does not fit even at the minimum n_ctx {sizes[-1]}: " + "; ".join(why),))


def choose_variant(candidates: Sequence[tuple[str, GGUFInfo]], budget: Budget,
                   policy: ContextPolicy | None = None, **estimate_kw: Any) -> Plan:
    """Plan every candidate and choose the best quality that fits (ties: the smaller file)."""
    policy = policy or ContextPolicy()
    ordered = sorted(candidates, key=lambda c: (quality_rank(c[1].quantization), c[1].weights_bytes, c[0]))
    plans: list[CandidatePlan] = []
    chosen: CandidatePlan | None = None
    for cid, info in ordered:
        p = plan_candidate(cid, info, budget, policy, **estimate_kw)
        if p.fits and chosen is None:
            p = CandidatePlan(p.id, p.quantization, p.rank, True, p.n_ctx, p.n_gpu_layers, p.estimate,
                              ("chosen: best quality that fits", *p.reasons))
            chosen = p
        elif p.fits and chosen is not None:
            p = CandidatePlan(p.id, p.quantization, p.rank, True, p.n_ctx, p.n_gpu_layers, p.estimate,
                              (f"fits, but {chosen.id} [{chosen.quantization}] ranks higher", *p.reasons))
        if quality_rank(p.quantization) == len(QUALITY_ORDER):
            p = CandidatePlan(p.id, p.quantization, p.rank, p.fits, p.n_ctx, p.n_gpu_layers, p.estimate,
                              (*p.reasons, f"quantization {p.quantization!r} is not in the quality order"))
        plans.append(p)
    if chosen is None:
        log.info("no variant fits the budget: %s", "; ".join(d.describe() for d in budget.devices))
    return Plan(chosen, tuple(plans), budget)
