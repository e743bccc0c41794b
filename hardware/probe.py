"""Sensor probes: one frozen snapshot of what the box has right now.

Every source is optional. A machine with no NVIDIA driver, no temperature sensors or no
swap gives a snapshot whose fields for that source are ``None`` ("unknown"), never an
exception. A source that fails logs one warning when it starts failing and one info line
when it comes back, not a traceback every tick.

Readings that cannot be real (negative, NaN, a temperature at or above 200 °C, more RAM
available than installed) are dropped to ``None`` by :func:`sanitize`, with one warning per
field when it turns bad.

The third-party boundaries are injectable: :class:`SystemSource` takes a psutil-like module
object and :class:`NvmlSource` a pynvml-like module object, so tests replay recorded data
through the real code paths instead of mocking ours.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: A temperature at or above this is a broken sensor, not a hot chip.
MAX_PLAUSIBLE_TEMP_C = 200.0

#: psutil sensor chips that report the CPU package/cores, most specific first.
CPU_SENSOR_CHIPS: tuple[str, ...] = (
    "coretemp", "k10temp", "zenpower", "cpu_thermal", "cpu-thermal", "soc_thermal", "cpu0_thermal",
)
#: Chips used only when none of CPU_SENSOR_CHIPS is present (the ACPI zone is a board reading).
FALLBACK_SENSOR_CHIPS: tuple[str, ...] = ("acpitz",)

#: NVML clock-event ("throttle") reason bits, decoded to stable names.
THROTTLE_REASON_BITS: dict[int, str] = {
    0x001: "gpu_idle",
    0x002: "applications_clocks_setting",
    0x004: "sw_power_cap",
    0x008: "hw_slowdown",
    0x010: "sync_boost",
    0x020: "sw_thermal_slowdown",
    0x040: "hw_thermal_slowdown",
    0x080: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


def decode_throttle_reasons(mask: int) -> tuple[str, ...]:
    """Names of the NVML clock throttle reason bits set in `mask` (unknown bits as hex)."""
    names = [name for bit, name in THROTTLE_REASON_BITS.items() if mask & bit]
    rest = mask & ~sum(THROTTLE_REASON_BITS)
    if rest:
        names.append(f"unknown_0x{rest:x}")
    return tuple(names)


@dataclass(frozen=True)
class GpuReading:
    """One GPU as NVML reports it; any field may be None (not supported / not known)."""

    index: int
    name: str | None = None
    memory_total_bytes: int | None = None
    memory_free_bytes: int | None = None
    temperature_c: float | None = None
    utilization_pct: float | None = None
    power_w: float | None = None
    #: Active clock throttle reasons by name; None when NVML cannot tell.
    throttle_reasons: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Snapshot:
    """What the box looks like at one instant. None everywhere means "unknown"."""

    time: float
    ram_total_bytes: int | None = None
    ram_available_bytes: int | None = None
    swap_total_bytes: int | None = None
    swap_used_bytes: int | None = None
    cpu_count: int | None = None
    load_1m: float | None = None
    #: Hottest CPU sensor reading (°C).
    cpu_temp_c: float | None = None
    #: Every CPU sensor reading as (chip/label, °C).
    cpu_temps: tuple[tuple[str, float], ...] = ()
    #: None when GPU telemetry is unavailable (no NVML); () when NVML works and sees no GPU.
    gpus: tuple[GpuReading, ...] | None = None
    disk_path: str | None = None
    disk_free_bytes: int | None = None
    #: Where the readings came from, e.g. "system" or "replay:overheat.jsonl".
    source: str = "system"

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able form (for the status API and the replay format)."""
        return dataclasses.asdict(self)


class SnapshotSource(Protocol):
    """Anything that can produce a snapshot by blocking calls (run in an executor)."""

    def read(self) -> Snapshot:
        """Take one reading."""
        ...


class SourceHealth:
    """Logs a source going bad once, and once more when it comes back."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.failing = False
        self.failures = 0

    def failed(self, why: str) -> None:
        """Record a failed read; warn only on the first of a run of failures."""
        self.failures += 1
        if not self.failing:
            self.failing = True
            log.warning("%s unavailable: %s (reported as unknown until it recovers)", self.name, why)

    def ok(self) -> None:
        """Record a good read; note a recovery."""
        if self.failing:
            self.failing = False
            log.info("%s is back", self.name)


def _plausible_number(v: float | None) -> bool:
    return v is not None and not math.isnan(v) and not math.isinf(v) and v >= 0


def plausible_temp(v: float | None) -> bool:
    """Whether `v` can be a real temperature reading in °C (known, finite, 0 <= v < 200)."""
    return _plausible_number(v) and v is not None and v < MAX_PLAUSIBLE_TEMP_C


class Sanitizer:
    """Drops nonsense readings from snapshots, warning once per field each time it turns bad."""

    def __init__(self) -> None:
        self._bad: set[str] = set()

    def _check(self, key: str, value: Any, ok: bool) -> Any:
        if value is None:
            return None
        if ok:
            self._bad.discard(key)
            return value
        if key not in self._bad:
            self._bad.add(key)
            log.warning("ignoring nonsense reading %s=%r", key, value)
        return None

    def __call__(self, s: Snapshot) -> Snapshot:
        """Return `s` with implausible values replaced by None."""
        c = self._check
        ram_total = c("ram_total_bytes", s.ram_total_bytes, _plausible_number(s.ram_total_bytes)
                      and bool(s.ram_total_bytes))
        avail_ok = _plausible_number(s.ram_available_bytes) and (
            ram_total is None or (s.ram_available_bytes or 0) <= ram_total)
        temps = tuple((label, t) for label, t in s.cpu_temps
                      if c(f"cpu_temps[{label}]", t, plausible_temp(t)) is not None)
        if s.cpu_temps:  # the hottest of the readings that survived
            cpu_temp = max((t for _, t in temps), default=None)
        else:
            cpu_temp = c("cpu_temp_c", s.cpu_temp_c, plausible_temp(s.cpu_temp_c))
        gpus = None if s.gpus is None else tuple(self._gpu(g) for g in s.gpus)
        return dataclasses.replace(
            s,
            ram_total_bytes=ram_total,
            ram_available_bytes=c("ram_available_bytes", s.ram_available_bytes, avail_ok),
            swap_total_bytes=c("swap_total_bytes", s.swap_total_bytes, _plausible_number(s.swap_total_bytes)),
            swap_used_bytes=c("swap_used_bytes", s.swap_used_bytes, _plausible_number(s.swap_used_bytes)),
            cpu_count=c("cpu_count", s.cpu_count, _plausible_number(s.cpu_count) and bool(s.cpu_count)),
            load_1m=c("load_1m", s.load_1m, _plausible_number(s.load_1m)),
            cpu_temp_c=cpu_temp,
            cpu_temps=temps,
            gpus=gpus,
            disk_free_bytes=c("disk_free_bytes", s.disk_free_bytes, _plausible_number(s.disk_free_bytes)),
        )

    def _gpu(self, g: GpuReading) -> GpuReading:
        c = self._check
        k = f"gpus[{g.index}]."
        total = c(k + "memory_total_bytes", g.memory_total_bytes,
                  _plausible_number(g.memory_total_bytes) and bool(g.memory_total_bytes))
        free_ok = _plausible_number(g.memory_free_bytes) and (
            total is None or (g.memory_free_bytes or 0) <= total)
        util_ok = _plausible_number(g.utilization_pct) and (g.utilization_pct or 0) <= 100
        return dataclasses.replace(
            g,
            memory_total_bytes=total,
            memory_free_bytes=c(k + "memory_free_bytes", g.memory_free_bytes, free_ok),
            temperature_c=c(k + "temperature_c", g.temperature_c, plausible_temp(g.temperature_c)),
            utilization_pct=c(k + "utilization_pct", g.utilization_pct, util_ok),
            power_w=c(k + "power_w", g.power_w, _plausible_number(g.power_w)),
        )


def _pick_cpu_temps(sensors: Mapping[str, Sequence[Any]]) -> tuple[tuple[str, float], ...]:
    chips = [n for n in CPU_SENSOR_CHIPS if n in sensors]
    chips = chips or [n for n in FALLBACK_SENSOR_CHIPS if n in sensors]
    out = []
    for chip in chips:
        for i, entry in enumerate(sensors[chip]):
            label = getattr(entry, "label", "") or str(i)
            current = getattr(entry, "current", None)
            if current is not None:
                out.append((f"{chip}/{label}", float(current)))
    return tuple(out)


class NvmlSource:
    """GPU readings through NVML. `nvml` is the pynvml module (or a recorded-data stand-in).

    NVML is initialised lazily and re-initialised after a failure, at most once per
    `retry_interval_s`; while it is down the GPU list is None (unknown).
    """

    def __init__(self, nvml: ModuleType | Any | None = None, *, retry_interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._nvml = nvml
        self._import_tried = nvml is not None
        self._initialised = False
        self._next_try = 0.0
        self._retry = retry_interval_s
        self._clock = clock
        self.health = SourceHealth("GPU telemetry (NVML)")

    def _module(self) -> Any | None:
        if not self._import_tried:
            self._import_tried = True
            try:
                import pynvml

                self._nvml = pynvml
            except ImportError as e:
                self.health.failed(f"pynvml is not installed ({e})")
        return self._nvml

    def read(self) -> tuple[GpuReading, ...] | None:
        """All GPUs, or None when NVML is not usable right now."""
        nvml = self._module()
        if nvml is None:
            return None
        now = self._clock()
        if not self._initialised:
            if now < self._next_try:
                return None
            try:
                nvml.nvmlInit()
            except Exception as e:  # NVMLError subclasses, OSError from a broken library
                self._next_try = now + self._retry
                self.health.failed(f"nvmlInit failed: {e}")
                return None
            self._initialised = True
        try:
            gpus = tuple(self._read_gpu(nvml, i) for i in range(int(nvml.nvmlDeviceGetCount())))
        except Exception as e:
            # A lost GPU, a driver reload, an unloaded library: start again on a later tick.
            self._initialised = False
            self._next_try = now + self._retry
            self.health.failed(f"NVML query failed: {e}")
            with _suppress():
                nvml.nvmlShutdown()
            return None
        self.health.ok()
        return gpus

    def _read_gpu(self, nvml: Any, index: int) -> GpuReading:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)

        unsupported = {getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", 3),
                       getattr(nvml, "NVML_ERROR_FUNCTION_NOT_FOUND", 13)}

        def opt(fn: Callable[[], Any]) -> Any:
            # A field this GPU or driver does not support is simply unknown; anything else aborts the read.
            try:
                return fn()
            except nvml.NVMLError as e:
                if getattr(e, "value", None) in unsupported:
                    return None
                raise

        name = opt(lambda: nvml.nvmlDeviceGetName(handle))
        mem = opt(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        temp = opt(lambda: nvml.nvmlDeviceGetTemperature(handle, getattr(nvml, "NVML_TEMPERATURE_GPU", 0)))
        util = opt(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        power_mw = opt(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        reasons = opt(lambda: nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))
        return GpuReading(
            index=index,
            name=name.decode() if isinstance(name, bytes) else name,
            memory_total_bytes=int(mem.total) if mem is not None else None,
            memory_free_bytes=int(mem.free) if mem is not None else None,
            temperature_c=float(temp) if temp is not None else None,
            utilization_pct=float(util.gpu) if util is not None else None,
            power_w=power_mw / 1000.0 if power_mw is not None else None,
            throttle_reasons=decode_throttle_reasons(int(reasons)) if reasons is not None else None,
        )

    def close(self) -> None:
        """Shut NVML down if this source initialised it."""
        if self._initialised and self._nvml is not None:
            self._initialised = False
            with _suppress():
                self._nvml.nvmlShutdown()


class _suppress:
    """Like contextlib.suppress(Exception), but logs what it swallowed at debug level."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: object) -> bool:
        if e is not None and isinstance(e, Exception):
            log.debug("ignored during cleanup: %r", e)
            return True
        return False


class SystemSource:
    """The live machine: psutil for RAM/swap/CPU/temperatures/disk, NVML for GPUs.

    `psutil_module` is the psutil module or any object with the same functions
    (virtual_memory, swap_memory, cpu_count, getloadavg, sensors_temperatures, disk_usage).
    """

    def __init__(self, state_dir: str | None = None, *, psutil_module: ModuleType | Any | None = None,
                 nvml: NvmlSource | None = None, clock: Callable[[], float] = time.time) -> None:
        if psutil_module is None:
            import psutil

            psutil_module = psutil
        self._ps = psutil_module
        self.state_dir = state_dir
        self.nvml = nvml if nvml is not None else NvmlSource()
        self._clock = clock
        self._health = {k: SourceHealth(n) for k, n in (
            ("mem", "RAM reading"), ("swap", "swap reading"), ("load", "CPU load reading"),
            ("temp", "CPU temperature sensors"), ("disk", "state-dir disk reading"))}

    def _guard(self, key: str, fn: Callable[[], Any]) -> Any:
        try:
            v = fn()
        except Exception as e:  # psutil raises OSError, AttributeError on platforms without it, ...
            self._health[key].failed(f"{type(e).__name__}: {e}")
            return None
        self._health[key].ok()
        return v

    def _temps(self) -> tuple[tuple[str, float], ...]:
        sensors = self._ps.sensors_temperatures()
        temps = _pick_cpu_temps(sensors or {})
        if not temps:
            raise LookupError("no CPU temperature sensor (looked for " + ", ".join(CPU_SENSOR_CHIPS) + ")")
        return temps

    def read(self) -> Snapshot:
        """Take one reading of every source; failing sources give None."""
        vm = self._guard("mem", self._ps.virtual_memory)
        sw = self._guard("swap", self._ps.swap_memory)
        load = self._guard("load", self._ps.getloadavg)
        temps = self._guard("temp", self._temps) or ()
        disk = self._guard("disk", lambda: self._ps.disk_usage(self.state_dir)) if self.state_dir else None
        try:
            cpus = self._ps.cpu_count()
        except Exception:
            cpus = None
        return Snapshot(
            time=self._clock(),
            ram_total_bytes=int(vm.total) if vm is not None else None,
            ram_available_bytes=int(vm.available) if vm is not None else None,
            swap_total_bytes=int(sw.total) if sw is not None else None,
            swap_used_bytes=int(sw.used) if sw is not None else None,
            cpu_count=int(cpus) if cpus else None,
            load_1m=float(load[0]) if load else None,
            cpu_temp_c=max((t for _, t in temps), default=None),
            cpu_temps=temps,
            gpus=self.nvml.read(),
            disk_path=self.state_dir,
            disk_free_bytes=int(disk.free) if disk is not None else None,
            source="system",
        )

    def close(self) -> None:
        """Release NVML."""
        self.nvml.close()


class Prober:
    """Takes sanitized snapshots from a source without blocking the event loop."""

    def __init__(self, source: SnapshotSource, *, executor: Executor | None = None) -> None:
        self.source = source
        self._executor = executor
        self._sanitize = Sanitizer()
        #: CPU seconds spent inside source reads (in the executor thread), cumulative.
        self.read_cpu_seconds = 0.0

    def _read(self) -> Snapshot:
        t0 = time.thread_time()
        try:
            return self._sanitize(self.source.read())
        finally:
            self.read_cpu_seconds += time.thread_time() - t0

    def read(self) -> Snapshot:
        """Blocking snapshot (for the CLI and tests)."""
        return self._read()

    async def snapshot(self) -> Snapshot:
        """One sanitized snapshot, read in an executor thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._read)

    def close(self) -> None:
        """Release the source (NVML) if it holds anything."""
        close = getattr(self.source, "close", None)
        if callable(close):
            close()
