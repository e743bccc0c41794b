"""Variant choice per governor state, on the real GGUF headers of SmolLM2 (Q4_1) and a Q4_0 made from it."""

from __future__ import annotations

import pytest

from hardware.governor import State
from hardware.probe import GpuReading, Snapshot
from runtime.placement import PlacementPolicy, decide
from runtime.store import ModelStore, Variant

GiB, MiB = 1 << 30, 1 << 20


@pytest.fixture
def family(tmp_path, smollm2_path, smollm2_q4_0_path) -> list[Variant]:
    store = ModelStore(tmp_path / "state")
    store.add_file(smollm2_path, family="smol")
    store.add_file(smollm2_q4_0_path, family="smol")
    return store.families()["smol"]


def snap(ram_available: int | None, gpus: tuple[GpuReading, ...] | None = None) -> Snapshot:
    return Snapshot(time=0.0, ram_total_bytes=16 * GiB, ram_available_bytes=ram_available, gpus=gpus)


POLICY = PlacementPolicy(max_n_ctx=2048, ram_headroom_bytes=256 * MiB)


def quant(d) -> str:
    assert d.variant is not None
    return d.variant.quantization


def test_normal_picks_the_best_quality_at_the_largest_context(family) -> None:
    d = decide({"smol": family}, snap(8 * GiB), State.NORMAL, POLICY)["smol"]
    assert quant(d) == "Q4_1" and d.n_ctx == 2048 and d.n_gpu_layers == 0
    assert "best quality" in d.why


def test_tight_memory_picks_the_smaller_context_or_variant(family) -> None:
    # room for Q4_1 only at a smaller context than the policy's 2048
    d = decide({"smol": family}, snap(256 * MiB + 170 * MiB), State.NORMAL, POLICY)["smol"]
    assert d.variant is not None and d.n_ctx < 2048


def test_constrained_steps_down_to_a_smaller_variant(family) -> None:
    d = decide({"smol": family}, snap(8 * GiB), State.CONSTRAINED, POLICY)["smol"]
    assert quant(d) == "Q4_0" and "constrained" in d.why


def test_critical_takes_the_smallest(family) -> None:
    d = decide({"smol": family}, snap(8 * GiB), State.CRITICAL, POLICY)["smol"]
    assert quant(d) == "Q4_0" and "critical" in d.why


def test_nothing_fits(family) -> None:
    d = decide({"smol": family}, snap(300 * MiB), State.NORMAL, POLICY)["smol"]
    assert d.variant is None and "no variant fits" in d.why and d.plan is not None


def test_unknown_ram_runs_the_first_healthy_variant(family) -> None:
    d = decide({"smol": family}, snap(None), State.NORMAL, POLICY)["smol"]
    assert d.variant is family[0] and "unknown" in d.why


def test_broken_variants_are_never_chosen(family) -> None:
    family[0].broken = "blob missing from the store"
    d = decide({"smol": family}, snap(8 * GiB), State.NORMAL, POLICY)["smol"]
    assert quant(d) == "Q4_0"


def test_a_gpu_with_room_gets_the_layers(family) -> None:
    # recorded NVML reading of an idle 24 GiB card
    gpu = GpuReading(index=0, name="NVIDIA L4", memory_total_bytes=24 * GiB, memory_free_bytes=22 * GiB,
                     temperature_c=40.0, utilization_pct=0.0, power_w=20.0, throttle_reasons=())
    d = decide({"smol": family}, snap(8 * GiB, (gpu,)), State.NORMAL, POLICY)["smol"]
    assert quant(d) == "Q4_1" and d.n_gpu_layers == 31  # 30 blocks + the output layer


def test_two_families_share_the_budget(family) -> None:
    # enough for one Q4_1 at 2048 but not two: the second family must take less
    one = decide({"a": family}, snap(8 * GiB), State.NORMAL, POLICY)["a"]
    assert one.plan is not None and one.plan.chosen is not None and one.plan.chosen.estimate is not None
    need = one.plan.chosen.estimate.total_bytes
    both = decide({"a": family, "b": family}, snap(256 * MiB + need + need // 2), State.NORMAL, POLICY)
    assert both["a"].n_ctx == 2048 and quant(both["a"]) == "Q4_1"
    b = both["b"]
    assert b.variant is None or b.n_ctx < 2048 or quant(b) == "Q4_0"
