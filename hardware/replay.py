"""Recorded sensors: replay a timeline of readings as if they came from the machine.

Used by the tests, by demos, and by the daemon's ``--sensor-replay FILE``: the governor
cannot tell a replayed snapshot from a live one.

Timeline format (JSON Lines, UTF-8)
-----------------------------------
One JSON object per line; blank lines and lines starting with ``#`` are comments.
Each object is the *complete* state of the box from its time on (nothing carries over
from the previous line; a field that is absent is unknown, i.e. None)::

    # t is seconds since the replay started; lines must be in non-decreasing t order
    {"t": 0,  "cpu_temp_c": 55.0, "ram_total_bytes": 17179869184, "ram_available_bytes": 8589934592}
    {"t": 60, "cpu_temp_c": 82.5, "ram_total_bytes": 17179869184, "ram_available_bytes": 8589934592,
     "gpus": [{"index": 0, "name": "NVIDIA L4", "temperature_c": 71, "memory_total_bytes": 24000000000,
               "memory_free_bytes": 20000000000, "throttle_reasons": ["sw_thermal_slowdown"]}]}

(one object per physical line; the example wraps only for reading.)

Keys: ``t`` (required, number >= 0) and any :class:`hardware.probe.Snapshot` field except
``time`` and ``source``: ``ram_total_bytes``, ``ram_available_bytes``, ``swap_total_bytes``,
``swap_used_bytes``, ``cpu_count``, ``load_1m``, ``cpu_temp_c``, ``cpu_temps`` (a list of
``[label, °C]`` pairs), ``gpus`` (a list of objects with :class:`hardware.probe.GpuReading`
fields; ``index`` defaults to the position; ``throttle_reasons`` is a list of names),
``disk_path``, ``disk_free_bytes``. ``"gpus"`` absent means GPU telemetry unknown; ``[]``
means no GPU. Unknown keys are errors, so a typo is caught when the file is loaded.

At replay time ``now - start`` selects the last line whose ``t`` is at or before it (no
interpolation); before the first line the first line holds, after the last the last one
holds. ``speed`` scales time (2.0 plays twice as fast).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from hardware.probe import GpuReading, Snapshot

log = logging.getLogger(__name__)

_SNAPSHOT_KEYS = {f.name for f in dataclasses.fields(Snapshot)} - {"time", "source"}
_GPU_KEYS = {f.name for f in dataclasses.fields(GpuReading)}
_INT_KEYS = {"ram_total_bytes", "ram_available_bytes", "swap_total_bytes", "swap_used_bytes", "cpu_count",
             "disk_free_bytes", "memory_total_bytes", "memory_free_bytes", "index"}
_STR_KEYS = {"disk_path", "name"}


class ReplayError(ValueError):
    """A timeline file is malformed; the message names the file and line."""


def _number(v: Any, key: str, where: str, integer: bool) -> int | float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ReplayError(f"{where}: {key} must be a number or null, got {v!r}")
    if integer:
        if isinstance(v, float) and not v.is_integer():
            raise ReplayError(f"{where}: {key} must be an integer, got {v!r}")
        return int(v)
    return float(v)


def _value(key: str, v: Any, where: str) -> Any:
    if key in _STR_KEYS:
        if v is not None and not isinstance(v, str):
            raise ReplayError(f"{where}: {key} must be a string or null, got {v!r}")
        return v
    return _number(v, key, where, key in _INT_KEYS)


def _gpu(i: int, obj: Any, where: str) -> GpuReading:
    if not isinstance(obj, dict):
        raise ReplayError(f"{where}: gpus[{i}] must be an object")
    unknown = set(obj) - _GPU_KEYS
    if unknown:
        raise ReplayError(f"{where}: gpus[{i}] has unknown keys {sorted(unknown)}")
    fields: dict[str, Any] = {"index": i}
    for k, v in obj.items():
        if k == "throttle_reasons":
            if v is not None and (not isinstance(v, list) or not all(isinstance(x, str) for x in v)):
                raise ReplayError(f"{where}: gpus[{i}].throttle_reasons must be a list of names or null")
            fields[k] = tuple(v) if v is not None else None
        else:
            fields[k] = _value(k, v, f"{where}: gpus[{i}]")
    return GpuReading(**fields)


def parse_line(text: str, where: str = "<line>") -> tuple[float, dict[str, Any]]:
    """Parse one timeline line into (t, Snapshot field values); raise ReplayError."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReplayError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict):
        raise ReplayError(f"{where}: each line must be a JSON object")
    if "t" not in obj:
        raise ReplayError(f"{where}: missing 't' (seconds since start)")
    t = _number(obj.pop("t"), "t", where, integer=False)
    if t is None or t < 0:
        raise ReplayError(f"{where}: 't' must be a number >= 0")
    unknown = set(obj) - _SNAPSHOT_KEYS
    if unknown:
        allowed = ", ".join(sorted(_SNAPSHOT_KEYS))
        raise ReplayError(f"{where}: unknown keys {sorted(unknown)} (allowed: t, {allowed})")
    fields: dict[str, Any] = {}
    for k, v in obj.items():
        if k == "gpus":
            if v is not None and not isinstance(v, list):
                raise ReplayError(f"{where}: gpus must be a list or null")
            fields[k] = None if v is None else tuple(_gpu(i, g, where) for i, g in enumerate(v))
        elif k == "cpu_temps":
            if not isinstance(v, list) or not all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in v
            ):
                raise ReplayError(f"{where}: cpu_temps must be a list of [label, temperature] pairs")
            fields[k] = tuple((p[0], _number(p[1], "cpu_temps", where, integer=False)) for p in v)
        else:
            fields[k] = _value(k, v, where)
    return float(t), fields


def load_timeline(lines: Iterable[str], name: str = "<timeline>") -> list[tuple[float, dict[str, Any]]]:
    """Parse timeline lines; raise ReplayError naming `name` and the line number."""
    out: list[tuple[float, dict[str, Any]]] = []
    for n, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{name}:{n}"
        t, fields = parse_line(text, where)
        if out and t < out[-1][0]:
            raise ReplayError(f"{where}: t={t} goes back in time (previous line has t={out[-1][0]})")
        out.append((t, fields))
    if not out:
        raise ReplayError(f"{name}: timeline has no readings")
    return out


def bundled_timeline(name: str) -> Path:
    """Path of a timeline shipped in hardware/timelines (e.g. 'overheat.jsonl')."""
    p = Path(str(resources.files("hardware").joinpath("timelines", name)))
    if not p.is_file():
        raise FileNotFoundError(f"no bundled timeline {name!r}; have: {', '.join(bundled_timelines())}")
    return p


def bundled_timelines() -> list[str]:
    """Names of the timelines shipped with the package."""
    d = resources.files("hardware").joinpath("timelines")
    return sorted(e.name for e in d.iterdir() if e.name.endswith(".jsonl"))


class ReplaySource:
    """A snapshot source that plays a recorded timeline against an injectable clock."""

    def __init__(self, timeline: list[tuple[float, dict[str, Any]]], *, name: str = "timeline",
                 clock: Callable[[], float] = time.monotonic, start: float | None = None,
                 speed: float = 1.0) -> None:
        if not timeline:
            raise ReplayError(f"{name}: timeline has no readings")
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self._timeline = timeline
        self.name = name
        self._clock = clock
        self._start = start
        self._speed = speed

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> ReplaySource:
        """Load a timeline file; raise ReplayError naming the bad line."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ReplayError(f"{p}: cannot read timeline: {e}") from e
        return cls(load_timeline(text.splitlines(), str(p)), name=p.name, **kwargs)

    @property
    def duration(self) -> float:
        """Offset (seconds) of the last line."""
        return self._timeline[-1][0]

    def offset(self) -> float:
        """Seconds of timeline elapsed; starts the replay on the first call if no start was given."""
        now = self._clock()
        if self._start is None:
            self._start = now
        return (now - self._start) * self._speed

    def read(self) -> Snapshot:
        """The latest recorded line at or before the current offset, as a Snapshot."""
        now = self._clock()
        off = self.offset()
        fields = self._timeline[0][1]
        for t, f in self._timeline:
            if t > off:
                break
            fields = f
        return Snapshot(time=now, source=f"replay:{self.name}", **fields)


def open_replay(spec: str | Path, **kwargs: Any) -> ReplaySource:
    """Source for ``--sensor-replay SPEC``: a timeline file path, or the name of a bundled timeline."""
    p = Path(spec)
    if p.is_file():
        return ReplaySource.from_file(p, **kwargs)
    name = p.name if p.suffix == ".jsonl" else f"{p.name}.jsonl"
    if str(spec) in (p.name, p.stem) and name in bundled_timelines():
        return ReplaySource.from_file(bundled_timeline(name), **kwargs)
    raise ReplayError(f"{spec}: no such timeline file, and not a bundled timeline "
                      f"({', '.join(bundled_timelines())})")
