from __future__ import annotations

import asyncio
import math

import pytest

from hardware.governor import Governor, GovernorStateMachine, GovernorThresholds, State, Transition
from hardware.probe import GpuReading, Prober, Snapshot
from hardware.replay import ReplaySource, bundled_timeline

from .fakes import Clock, GiB


def run_timeline(name: str, until: float = 400.0, step: float = 5.0) -> list[tuple[float, State, State]]:
    clock = Clock(0.0)
    prober = Prober(ReplaySource.from_file(bundled_timeline(name), clock=clock, start=0.0))
    machine = GovernorStateMachine()
    out = []
    t = 0.0
    while t <= until:
        clock.t = t
        tr = machine.update(prober.read(), t)
        if tr:
            out.append((t, tr.from_state, tr.to_state))
        t += step
    return out


N, C, X = State.NORMAL, State.CONSTRAINED, State.CRITICAL


def test_overheat_timeline_exact_sequence_with_hysteresis_and_dwell() -> None:
    # 88 °C at t=180 is under 90 but not under 85: still critical (hysteresis); 84 °C at t=210 starts
    # the 30 s dwell; 78 °C at t=270 is under 80 but not under 75; 72 °C at t=300 starts the dwell.
    assert run_timeline("overheat.jsonl") == [(60, N, C), (120, C, X), (240, X, C), (330, C, N)]


def test_memory_pressure_timeline_exact_sequence() -> None:
    assert run_timeline("memory-pressure.jsonl") == [(60, N, C), (120, C, X), (210, X, C), (270, C, N)]


def test_sequence_does_not_depend_on_tick_rate() -> None:
    assert [s[1:] for s in run_timeline("overheat.jsonl", step=1.0)] == [(N, C), (C, X), (X, C), (C, N)]


def cpu(t: float | None) -> Snapshot:
    return Snapshot(time=0.0, cpu_temp_c=t, ram_total_bytes=16 * GiB, ram_available_bytes=8 * GiB)


def test_every_transition_has_a_reason() -> None:
    m = GovernorStateMachine()
    tr = m.update(cpu(93.0), 0.0)
    assert isinstance(tr, Transition) and tr.to_state == X
    assert "CPU temperature 93.0 °C" in tr.reason
    m.update(cpu(60.0), 1.0)
    tr = m.update(cpu(60.0), 31.0)
    assert tr is not None and tr.to_state == C and "below the critical exit levels for 30 s" in tr.reason
    assert [t.to_state for t in m.history] == [X, C]


def test_flapping_around_a_threshold_does_not_flap() -> None:
    m = GovernorStateMachine()
    transitions = [m.update(cpu(79.0 if i % 2 else 81.0), float(i)) for i in range(600)]
    assert [t.to_state for t in transitions if t] == [C]


def test_wild_oscillation_never_stays_clear_long_enough() -> None:
    m = GovernorStateMachine()
    # 70 °C and 85 °C every 10 s for 10 minutes: clear periods are shorter than the dwell
    transitions = [m.update(cpu(70.0 if (i // 10) % 2 else 85.0), float(i)) for i in range(600)]
    assert [t.to_state for t in transitions if t] == [C]


def test_escalation_is_immediate_but_descent_is_one_step_per_dwell() -> None:
    m = GovernorStateMachine(GovernorThresholds(min_dwell_s=20.0))
    assert m.update(cpu(95.0), 0.0) is not None and m.state == X
    states = []
    for t in range(1, 80):
        if (tr := m.update(cpu(40.0), float(t))) is not None:
            states.append((t, tr.to_state))
    assert states == [(21, C), (41, N)]


def test_unknown_readings_never_trigger_a_transition() -> None:
    m = GovernorStateMachine()
    for t in range(100):
        assert m.update(Snapshot(time=0.0), float(t)) is None
    assert m.update(cpu(85.0), 100.0) is not None and m.state == C
    # the CPU sensor disappears while constrained: unknown is not "clear", so no descent
    for t in range(101, 400):
        assert m.update(cpu(None), float(t)) is None
    assert m.state == C
    # it comes back cool: the dwell starts only now
    assert m.update(cpu(50.0), 400.0) is None
    assert m.update(cpu(50.0), 429.0) is None
    tr = m.update(cpu(50.0), 430.0)
    assert tr is not None and tr.to_state == N


@pytest.mark.parametrize("bad", [1000.0, -3.0, math.nan, 200.0])
def test_nonsense_readings_never_trigger_a_transition(bad: float) -> None:
    m = GovernorStateMachine()
    gpu = GpuReading(index=0, temperature_c=bad, throttle_reasons=())
    snap = Snapshot(time=0.0, cpu_temp_c=bad, gpus=(gpu,), ram_total_bytes=GiB, ram_available_bytes=2 * GiB)
    assert all(m.update(snap, float(t)) is None for t in range(50))
    assert m.state == N


def test_gpu_thermal_throttling_constrains_but_power_cap_does_not() -> None:
    m = GovernorStateMachine()
    capped = Snapshot(time=0.0, gpus=(GpuReading(index=0, temperature_c=60.0,
                                                 throttle_reasons=("sw_power_cap",)),))
    assert m.update(capped, 0.0) is None
    hot = Snapshot(time=0.0, gpus=(GpuReading(index=0, temperature_c=60.0,
                                              throttle_reasons=("hw_thermal_slowdown",)),))
    tr = m.update(hot, 1.0)
    assert tr is not None and tr.to_state == C and "GPU 0 throttling (hw_thermal_slowdown)" in tr.reason
    gpu_critical = Snapshot(time=0.0, gpus=(GpuReading(index=1, temperature_c=89.0),))
    tr = m.update(gpu_critical, 2.0)
    assert tr is not None and tr.to_state == X and "GPU 1 temperature 89.0" in tr.reason


def test_history_is_bounded() -> None:
    m = GovernorStateMachine(GovernorThresholds(min_dwell_s=0.0, history_size=5))
    for i in range(50):
        m.update(cpu(95.0 if i % 2 == 0 else 20.0), float(i))
    assert len(m.history) == 5


def test_thresholds_are_validated_and_documented() -> None:
    with pytest.raises(ValueError, match="cpu_constrained_c must be below cpu_critical_c"):
        GovernorThresholds(cpu_constrained_c=95.0)
    with pytest.raises(ValueError, match="ram_critical_available_pct"):
        GovernorThresholds(ram_critical_available_pct=20.0)
    helps = GovernorThresholds.help()
    assert set(helps) >= {"cpu_constrained_c", "min_dwell_s", "temp_hysteresis_c"}
    assert all(helps.values())


async def test_governor_loop_reports_transitions_and_its_cpu_cost() -> None:
    clock = Clock(0.0)
    replay = ReplaySource.from_file(bundled_timeline("overheat.jsonl"), clock=clock, start=0.0)
    gov = Governor(Prober(replay), interval_s=0.001, clock=clock)
    seen: list[tuple[State, State]] = []
    done = asyncio.Event()

    async def on_transition(tr: Transition, snap: Snapshot) -> None:
        seen.append((tr.from_state, tr.to_state))
        assert snap.source == "replay:overheat.jsonl"
        if tr.to_state == N:
            done.set()

    async def broken(tr: Transition, snap: Snapshot) -> None:
        raise RuntimeError("a subscriber bug must not stop the governor")

    gov.on_transition(broken)
    gov.on_transition(on_transition)

    async def advance() -> None:
        while not done.is_set():
            clock.t += 5.0
            await asyncio.sleep(0.002)

    await gov.start()
    mover = asyncio.create_task(advance())
    await asyncio.wait_for(done.wait(), timeout=10)
    await gov.stop()
    await mover
    assert seen == [(N, C), (C, X), (X, C), (C, N)]
    assert gov.state == N and gov.ticks > 0
    assert gov.cpu_seconds > 0 and gov.cpu_percent is not None
    status = gov.status()
    assert status["state"] == "normal" and len(status["history"]) == 4
    await gov.stop()  # idempotent


async def test_governor_survives_a_failing_probe() -> None:
    class Flaky:
        def __init__(self) -> None:
            self.calls = 0

        def read(self) -> Snapshot:
            self.calls += 1
            if self.calls <= 3:
                raise OSError("sensor bus error")
            return cpu(95.0)

    gov = Governor(Prober(Flaky()), interval_s=0.001)
    await gov.start()
    for _ in range(200):
        await asyncio.sleep(0.002)
        if gov.state == X:
            break
    await gov.stop()
    assert gov.state == X
