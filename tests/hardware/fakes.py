"""Recorded-data stand-ins for the two third-party boundaries: psutil and pynvml.

They replay readings captured from real machines (a Xeon box with coretemp, an NVIDIA L4 under
load) through the same call signatures, so the probe code under test is the production code.
Failures are injected the way the libraries raise them (pynvml's own NVMLError classes).
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass, field
from typing import Any

import pynvml

# psutil's result shapes (same field names as psutil's namedtuples).
svmem = namedtuple("svmem", "total available percent used free")
sswap = namedtuple("sswap", "total used free percent sin sout")
sdiskusage = namedtuple("sdiskusage", "total used free percent")
shwtemp = namedtuple("shwtemp", "label current high critical")

GiB = 1 << 30

#: `psutil.sensors_temperatures()` on a 2-socket Xeon with coretemp (trimmed), plus the ACPI zone.
XEON_SENSORS = {
    "coretemp": [shwtemp("Package id 0", 61.0, 84.0, 94.0), shwtemp("Core 0", 58.0, 84.0, 94.0),
                 shwtemp("Core 1", 60.0, 84.0, 94.0)],
    "acpitz": [shwtemp("", 27.8, 119.0, 119.0)],
    "nvme": [shwtemp("Composite", 38.9, 81.8, 84.8)],
}


class FakePsutil:
    """psutil-like object answering with recorded values; tests change the fields between reads."""

    def __init__(self) -> None:
        self.total = 64 * GiB
        self.available = 40 * GiB
        self.swap_total = 8 * GiB
        self.swap_used = 1 * GiB
        self.cpus: int | None = 16
        self.load = (2.5, 2.1, 1.9)
        self.sensors: dict[str, list[Any]] = {k: list(v) for k, v in XEON_SENSORS.items()}
        self.disk_free = 120 * GiB
        self.sensors_error: Exception | None = None

    def virtual_memory(self) -> Any:
        return svmem(self.total, self.available, 100.0 * (1 - self.available / self.total),
                     self.total - self.available, self.available)

    def swap_memory(self) -> Any:
        return sswap(self.swap_total, self.swap_used, self.swap_total - self.swap_used, 12.5, 0, 0)

    def cpu_count(self) -> int | None:
        return self.cpus

    def getloadavg(self) -> tuple[float, float, float]:
        return self.load

    def sensors_temperatures(self) -> dict[str, list[Any]]:
        if self.sensors_error is not None:
            raise self.sensors_error
        return self.sensors

    def disk_usage(self, path: str) -> Any:
        return sdiskusage(500 * GiB, 500 * GiB - self.disk_free, self.disk_free, 76.0)


@dataclass
class FakeGpu:
    """One GPU's recorded NVML answers (an NVIDIA L4 at steady inference load)."""

    name: str = "NVIDIA L4"
    total: int = 23034 * (1 << 20)
    free: int = 9120 * (1 << 20)
    temperature: float = 71
    util_gpu: int = 97
    util_mem: int = 61
    power_mw: int | None = 68540
    throttle: int = 0x004  # sw_power_cap, normal under load


@dataclass
class _Mem:
    total: int
    free: int
    used: int


@dataclass
class _Util:
    gpu: int
    memory: int


@dataclass
class FakeNvml:
    """pynvml-like module object. Set `init_error`/`query_error` to make calls fail like NVML does."""

    gpus: list[FakeGpu] = field(default_factory=lambda: [FakeGpu()])
    init_error: int | None = None
    query_error: int | None = None
    init_calls: int = 0
    shutdown_calls: int = 0

    NVMLError = pynvml.NVMLError
    NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def _check(self) -> None:
        if self.query_error is not None:
            raise pynvml.NVMLError(self.query_error)

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        self._check()
        return self.gpus[i]

    def nvmlDeviceGetName(self, h: FakeGpu) -> str:
        return h.name

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> _Mem:
        self._check()
        return _Mem(h.total, h.free, h.total - h.free)

    def nvmlDeviceGetTemperature(self, h: FakeGpu, sensor: int) -> float:
        self._check()
        return h.temperature

    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu) -> _Util:
        return _Util(h.util_gpu, h.util_mem)

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:
        if h.power_mw is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return h.power_mw

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: FakeGpu) -> int:
        return h.throttle


class Clock:
    """A settable clock for injecting time."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t
