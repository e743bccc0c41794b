from __future__ import annotations

import asyncio
import logging
import math
import sys

import pynvml
import pytest

from hardware.governor import GovernorStateMachine, State
from hardware.probe import (
    GpuReading,
    NvmlSource,
    Prober,
    Sanitizer,
    Snapshot,
    SystemSource,
    decode_throttle_reasons,
)

from .fakes import Clock, FakeGpu, FakeNvml, FakePsutil, GiB, shwtemp


def warnings_from(caplog: pytest.LogCaptureFixture, module: str = "hardware.probe") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == module and r.levelno == logging.WARNING]


def system(ps: FakePsutil | None = None, nvml: FakeNvml | None = None,
           clock: Clock | None = None) -> SystemSource:
    clock = clock or Clock(1000.0)
    return SystemSource("/var/lib/atoll", psutil_module=ps or FakePsutil(),
                        nvml=NvmlSource(nvml or FakeNvml(), retry_interval_s=60, clock=clock), clock=clock)


def test_full_reading_from_recorded_machine() -> None:
    snap = Prober(system()).read()
    assert snap.ram_total_bytes == 64 * GiB and snap.ram_available_bytes == 40 * GiB
    assert snap.swap_used_bytes == 1 * GiB and snap.cpu_count == 16 and snap.load_1m == 2.5
    # coretemp wins over acpitz and nvme; the hottest coretemp reading is the CPU temperature
    assert snap.cpu_temp_c == 61.0
    assert [label for label, _ in snap.cpu_temps] == [
        "coretemp/Package id 0", "coretemp/Core 0", "coretemp/Core 1"]
    assert snap.disk_free_bytes == 120 * GiB and snap.disk_path == "/var/lib/atoll"
    assert snap.gpus is not None and len(snap.gpus) == 1
    g = snap.gpus[0]
    assert g == GpuReading(index=0, name="NVIDIA L4", memory_total_bytes=23034 << 20,
                           memory_free_bytes=9120 << 20, temperature_c=71.0, utilization_pct=97.0,
                           power_w=68.54, throttle_reasons=("sw_power_cap",))


def test_acpitz_is_the_fallback_cpu_temperature() -> None:
    ps = FakePsutil()
    ps.sensors = {"acpitz": [shwtemp("", 47.0, 119.0, 119.0)], "nvme": [shwtemp("Composite", 39.0, 80, 85)]}
    assert Prober(system(ps)).read().cpu_temp_c == 47.0


def test_throttle_reasons_decoded_to_names() -> None:
    assert decode_throttle_reasons(0) == ()
    assert decode_throttle_reasons(0x20 | 0x40 | 0x4) == (
        "sw_power_cap", "sw_thermal_slowdown", "hw_thermal_slowdown")
    assert decode_throttle_reasons(0x10000) == ("unknown_0x10000",)


def test_nvml_library_missing_is_unknown_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    clock = Clock(0.0)
    prober = Prober(system(nvml=nvml, clock=clock))
    snaps = []
    for t in range(0, 300, 5):
        clock.t = float(t)
        snaps.append(prober.read())
    assert all(s.gpus is None for s in snaps)
    assert all(s.ram_total_bytes == 64 * GiB for s in snaps)  # the other sources are unaffected
    nvml_warnings = [w for w in warnings_from(caplog) if "NVML" in w]
    assert len(nvml_warnings) == 1 and "Shared Library Not Found" in nvml_warnings[0]
    assert nvml.init_calls == 5  # retried once a minute (t=0, 60, 120, 180, 240), not every tick


def test_pynvml_not_installed_is_unknown(monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    src = NvmlSource()
    assert src.read() is None and src.read() is None
    assert len([w for w in warnings_from(caplog) if "pynvml is not installed" in w]) == 1


def test_this_machine_without_gpu_or_sensors_does_not_crash() -> None:
    """The real psutil and pynvml on this VM: no NVIDIA driver, no sensors."""
    snap = Prober(SystemSource("/tmp")).read()
    assert snap.ram_total_bytes and snap.ram_available_bytes is not None
    assert snap.cpu_count and snap.disk_free_bytes is not None
    if snap.gpus is None:
        assert snap.to_json()["gpus"] is None


def test_nvml_failing_mid_run_then_recovering(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml()
    clock = Clock(0.0)
    prober = Prober(system(nvml=nvml, clock=clock))
    assert prober.read().gpus is not None
    nvml.query_error = pynvml.NVML_ERROR_GPU_IS_LOST
    for t in (5, 10, 15, 20):
        clock.t = t
        assert prober.read().gpus is None
    assert nvml.shutdown_calls == 1 and nvml.init_calls == 1  # no re-init before the retry interval
    lost = [w for w in warnings_from(caplog) if "GPU is lost" in w]
    assert len(lost) == 1
    nvml.query_error = None
    clock.t = 64.0
    assert prober.read().gpus is None  # first failure at t=5: next try at t=65
    clock.t = 65.0
    snap = prober.read()
    assert snap.gpus is not None and snap.gpus[0].temperature_c == 71.0
    assert nvml.init_calls == 2
    assert any("is back" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_nvml_unsupported_field_is_just_unknown(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml(gpus=[FakeGpu(power_mw=None), FakeGpu(name="NVIDIA T4", temperature=55)])
    snap = Prober(system(nvml=nvml)).read()
    assert snap.gpus is not None and len(snap.gpus) == 2
    assert snap.gpus[0].power_w is None and snap.gpus[0].temperature_c == 71.0
    assert snap.gpus[1].name == "NVIDIA T4" and snap.gpus[1].index == 1
    assert warnings_from(caplog) == []


def test_cpu_sensor_disappears_and_comes_back(caplog: pytest.LogCaptureFixture) -> None:
    ps = FakePsutil()
    prober = Prober(system(ps))
    assert prober.read().cpu_temp_c == 61.0
    ps.sensors = {"nvme": ps.sensors["nvme"]}  # coretemp module unloaded
    for _ in range(5):
        assert prober.read().cpu_temp_c is None
    assert len([w for w in warnings_from(caplog) if "CPU temperature" in w]) == 1
    ps.sensors = {"coretemp": [shwtemp("Package id 0", 64.0, 84.0, 94.0)]}
    assert prober.read().cpu_temp_c == 64.0
    assert any("CPU temperature sensors is back" in r.getMessage() for r in caplog.records)


def test_sensor_read_raising_is_unknown(caplog: pytest.LogCaptureFixture) -> None:
    ps = FakePsutil()
    ps.sensors_error = OSError(5, "Input/output error")
    prober = Prober(system(ps))
    snaps = [prober.read() for _ in range(3)]
    assert all(s.cpu_temp_c is None and s.ram_available_bytes == 40 * GiB for s in snaps)
    assert len(warnings_from(caplog)) == 1


@pytest.mark.parametrize("bad", [-5.0, math.nan, 1000.0, 200.0, math.inf])
def test_nonsense_cpu_temperature_dropped_with_one_warning_and_no_governor_action(
        bad: float, caplog: pytest.LogCaptureFixture) -> None:
    ps = FakePsutil()
    ps.sensors = {"coretemp": [shwtemp("Package id 0", bad, 84.0, 94.0)]}
    prober = Prober(system(ps))
    machine = GovernorStateMachine()
    for t in range(10):
        snap = prober.read()
        assert snap.cpu_temp_c is None and snap.cpu_temps == ()
        assert machine.update(snap, float(t * 5)) is None
    assert machine.state == State.NORMAL
    assert len(warnings_from(caplog)) == 1
    assert "nonsense" in warnings_from(caplog)[0]


def test_one_nonsense_sensor_does_not_hide_the_sane_ones(caplog: pytest.LogCaptureFixture) -> None:
    ps = FakePsutil()
    ps.sensors = {"coretemp": [shwtemp("Package id 0", 1000.0, 84, 94), shwtemp("Core 0", 83.0, 84, 94)]}
    snap = Prober(system(ps)).read()
    assert snap.cpu_temp_c == 83.0
    assert len(warnings_from(caplog)) == 1


def test_nonsense_memory_and_gpu_readings_dropped(caplog: pytest.LogCaptureFixture) -> None:
    ps = FakePsutil()
    ps.available = ps.total + GiB  # more available than installed
    nvml = FakeNvml(gpus=[FakeGpu(temperature=-40.0, free=(23034 << 20) * 2)])
    prober = Prober(system(ps, nvml))
    for _ in range(3):
        snap = prober.read()
        assert snap.ram_available_bytes is None and snap.ram_total_bytes == 64 * GiB
        assert snap.gpus is not None
        assert snap.gpus[0].temperature_c is None and snap.gpus[0].memory_free_bytes is None
        assert snap.gpus[0].memory_total_bytes == 23034 << 20
    assert len(warnings_from(caplog)) == 3  # one per bad field, not one per tick


def test_sanitizer_warns_again_only_after_a_good_reading(caplog: pytest.LogCaptureFixture) -> None:
    sanitize = Sanitizer()
    hot, ok = Snapshot(time=0, cpu_temp_c=999.0), Snapshot(time=0, cpu_temp_c=50.0)
    for s in (hot, hot, ok, hot, hot):
        sanitize(s)
    assert len(warnings_from(caplog)) == 2


async def test_async_snapshot_runs_in_executor_and_counts_cpu() -> None:
    prober = Prober(system())
    snaps = await asyncio.gather(*(prober.snapshot() for _ in range(5)))
    assert all(s.cpu_temp_c == 61.0 for s in snaps)
    assert prober.read_cpu_seconds > 0
