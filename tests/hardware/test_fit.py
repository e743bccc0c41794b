from __future__ import annotations

import pytest

from hardware.fit import (
    QUALITY_ORDER,
    Budget,
    ContextPolicy,
    DeviceBudget,
    budget_from_snapshot,
    choose_variant,
    quality_rank,
)
from hardware.gguf import GGUFInfo
from hardware.probe import GpuReading, Snapshot

from .variants import requantized

MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture(scope="module")
def candidates(smollm2: GGUFInfo, gemma3: GGUFInfo) -> list[tuple[str, GGUFInfo]]:
    """SmolLM2 as shipped (Q4_1) plus F16/Q8_0/Q2_K built from its real header, and an F32 gemma3."""
    return [
        ("smollm2-q4_1", smollm2),
        ("smollm2-q2_k", requantized(smollm2, "Q2_K")),
        ("smollm2-f16", requantized(smollm2, "F16")),
        ("smollm2-q8_0", requantized(smollm2, "Q8_0")),
        ("gemma3-f32", requantized(gemma3, "F32")),
    ]


def cpu_budget(usable: int, headroom: int = 256 * MiB) -> Budget:
    return Budget((DeviceBudget("cpu", usable + headroom, headroom),))


def test_quality_order() -> None:
    ranked = sorted(["Q4_K_M", "IQ1_S", "F16", "Q8_0", "F32", "Q5_K_M", "Q6_K", "BF16", "Q2_K", "WEIRD"],
                    key=quality_rank)
    assert ranked[0] == "F32" and set(ranked[1:3]) == {"F16", "BF16"}
    assert quality_rank("BF16") == quality_rank("F16")
    assert ranked[3:] == ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q2_K", "IQ1_S", "WEIRD"]
    assert quality_rank("WEIRD") == len(QUALITY_ORDER)


@pytest.mark.parametrize(("usable_mib", "chosen", "n_ctx"), [
    (1024, "smollm2-f16", 8192),  # everything small fits at the full trained context
    (400, "smollm2-f16", 2048),   # quality first: F16 at 2048 beats Q8_0 at 4096
    (250, "smollm2-q8_0", 1024),  # F16 needs ~311 MiB even at 512
    (120, "smollm2-q2_k", 512),   # only the 2-bit variant fits
])
def test_best_quality_that_fits_then_largest_context(candidates: list[tuple[str, GGUFInfo]], usable_mib: int,
                                                     chosen: str, n_ctx: int) -> None:
    plan = choose_variant(candidates, cpu_budget(usable_mib * MiB))
    assert plan.chosen is not None
    assert (plan.chosen.id, plan.chosen.n_ctx, plan.chosen.n_gpu_layers) == (chosen, n_ctx, 0)
    assert plan.chosen.estimate is not None and plan.chosen.estimate.total_bytes <= usable_mib * MiB
    assert plan.chosen.reasons[0] == "chosen: best quality that fits"
    # candidates are listed best quality first
    assert [c.quantization for c in plan.candidates] == ["F32", "F16", "Q8_0", "Q4_1", "Q2_K"]


def test_a_variant_too_large_for_every_budget_is_explained(candidates: list[tuple[str, GGUFInfo]]) -> None:
    for usable in (64 * MiB, 250 * MiB, 1 * GiB):
        plan = choose_variant(candidates, cpu_budget(usable))
        gemma = next(c for c in plan.candidates if c.id == "gemma3-f32")
        assert not gemma.fits and gemma.n_ctx is None
        assert gemma.reasons[0].startswith(
            "does not fit even at the minimum n_ctx 512: needs 1.07 GiB on cpu")
        assert "- gemma3-f32 [F32]: does not fit" in plan.explain()


def test_nothing_fits(candidates: list[tuple[str, GGUFInfo]]) -> None:
    plan = choose_variant(candidates, cpu_budget(64 * MiB))
    assert plan.chosen is None and not any(c.fits for c in plan.candidates)
    assert plan.explain().endswith("no candidate fits the budget")
    assert "cpu: 64 MiB usable (320 MiB available - 256 MiB headroom)" in plan.explain()
    assert plan.to_json()["chosen"] is None


def test_fitting_but_lower_quality_candidates_say_so(candidates: list[tuple[str, GGUFInfo]]) -> None:
    plan = choose_variant(candidates, cpu_budget(400 * MiB))
    q8 = next(c for c in plan.candidates if c.id == "smollm2-q8_0")
    assert q8.fits and q8.n_ctx == 4096
    assert q8.reasons[0] == "fits, but smollm2-f16 [F16] ranks higher"
    assert any("n_ctx 8192 would not fit" in r for r in q8.reasons)


def test_policy_caps_context(candidates: list[tuple[str, GGUFInfo]], smollm2: GGUFInfo) -> None:
    plan = choose_variant(candidates, cpu_budget(4 * GiB), ContextPolicy(max_n_ctx=2048))
    assert plan.chosen is not None and plan.chosen.n_ctx == 2048
    # the model's trained context (8192) caps a larger policy maximum
    assert ContextPolicy(max_n_ctx=65536).sizes_for(smollm2)[0] == 8192
    assert ContextPolicy(max_n_ctx=3000, candidates=(4096, 2048)).sizes_for(smollm2) == [3000, 2048]


def test_gpu_budget_offloads_layers(candidates: list[tuple[str, GGUFInfo]]) -> None:
    budget = Budget((DeviceBudget("cpu", 200 * MiB), DeviceBudget("gpu0", 2 * GiB, 256 * MiB)))
    plan = choose_variant(candidates, budget)
    assert plan.chosen is not None
    assert (plan.chosen.id, plan.chosen.n_ctx, plan.chosen.n_gpu_layers) == ("smollm2-f16", 8192, 31)
    assert "with 31/31 layers on GPU" in plan.chosen.reasons[1]
    # a small GPU takes only part of the model
    small = Budget((DeviceBudget("cpu", 250 * MiB), DeviceBudget("gpu0", 700 * MiB, 256 * MiB)))
    part = choose_variant(candidates, small)
    assert part.chosen is not None and part.chosen.n_gpu_layers is not None
    assert 0 < part.chosen.n_gpu_layers < 31
    assert part.chosen.estimate is not None
    for d in part.chosen.estimate.devices:
        assert d.total_bytes <= small.usable(d.device)


def test_budget_from_snapshot() -> None:
    snap = Snapshot(time=0.0, ram_available_bytes=8 * GiB, ram_total_bytes=16 * GiB, gpus=(
        GpuReading(index=0, memory_free_bytes=20 * GiB), GpuReading(index=1, memory_free_bytes=None)))
    b = budget_from_snapshot(snap, ram_headroom_bytes=GiB, vram_headroom_bytes=GiB, reclaimable_bytes=GiB)
    assert b is not None
    assert [(d.device, d.usable_bytes) for d in b.devices] == [("cpu", 8 * GiB), ("gpu0", 19 * GiB)]
    half = budget_from_snapshot(snap, ram_headroom_bytes=0, fraction=0.5)
    assert half is not None and half.usable("cpu") == 4 * GiB
    assert budget_from_snapshot(Snapshot(time=0.0)) is None
    with pytest.raises(ValueError, match="'cpu' entry"):
        Budget((DeviceBudget("gpu0", GiB),))
