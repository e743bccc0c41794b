"""The thermal/memory governor: normal / constrained / critical, without flapping.

Rules (all thresholds in :class:`GovernorThresholds`):

* **Escalation is immediate.** One snapshot with a reading at or past a threshold moves the
  state up (possibly straight from normal to critical): heat and memory exhaustion do not wait.
* **De-escalation is slow and one step at a time.** The state drops one level only when every
  reading has been below the *exit* level (threshold minus hysteresis) continuously for
  ``min_dwell_s`` and the state itself is at least ``min_dwell_s`` old.
* **Unknown is not clear.** A reading that is None (sensor missing, NVML down) never causes a
  transition: it cannot raise the state, and while a reading that held the current state up is
  unknown the state does not drop either.
* **Nonsense is ignored.** Temperatures that are NaN, negative or >= 200 °C, and available memory
  above the total, are treated as unknown (the prober already warned about them).

Signals: CPU temperature (hottest sensor), each GPU's temperature, GPU thermal throttling
(constrained at most), and available RAM as a share of the total. GPU memory is deliberately
not a signal: a loaded model fills VRAM on purpose, and budgets handle it (see hardware.fit).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from hardware.probe import Prober, Snapshot, plausible_temp

log = logging.getLogger(__name__)


class State(enum.IntEnum):
    """Governor states, ordered by severity."""

    NORMAL = 0
    CONSTRAINED = 1
    CRITICAL = 2

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class GovernorThresholds:
    """When the governor changes state. Every field has help text for the settings schema."""

    cpu_constrained_c: float = field(default=80.0, metadata={
        "help": "CPU temperature (°C, hottest sensor) at which the box becomes constrained"})
    cpu_critical_c: float = field(default=90.0, metadata={
        "help": "CPU temperature (°C) at which the box becomes critical"})
    gpu_constrained_c: float = field(default=80.0, metadata={
        "help": "GPU temperature (°C, any GPU) at which the box becomes constrained"})
    gpu_critical_c: float = field(default=88.0, metadata={
        "help": "GPU temperature (°C) at which the box becomes critical"})
    temp_hysteresis_c: float = field(default=5.0, metadata={
        "help": "a temperature must fall this far below a threshold before the state may drop"})
    ram_constrained_available_pct: float = field(default=10.0, metadata={
        "help": "available RAM (% of total) at or below which the box becomes constrained"})
    ram_critical_available_pct: float = field(default=5.0, metadata={
        "help": "available RAM (% of total) at or below which the box becomes critical"})
    ram_hysteresis_pct: float = field(default=2.0, metadata={
        "help": "available RAM must rise this many points above a threshold before the state may drop"})
    throttle_constrained_reasons: tuple[str, ...] = field(default=(
        "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_slowdown", "hw_power_brake_slowdown",
    ), metadata={"help": "NVML clock throttle reasons that make the box constrained (power cap is normal "
                         "under load and is not listed by default)"})
    min_dwell_s: float = field(default=30.0, metadata={
        "help": "seconds a state is held, and readings must stay clear, before stepping down a level"})
    history_size: int = field(default=100, metadata={"help": "transitions kept in the governor's history"})

    def __post_init__(self) -> None:
        problems = []
        if not self.cpu_constrained_c < self.cpu_critical_c:
            problems.append("cpu_constrained_c must be below cpu_critical_c")
        if not self.gpu_constrained_c < self.gpu_critical_c:
            problems.append("gpu_constrained_c must be below gpu_critical_c")
        if not self.ram_critical_available_pct < self.ram_constrained_available_pct:
            problems.append("ram_critical_available_pct must be below ram_constrained_available_pct")
        if self.temp_hysteresis_c < 0 or self.ram_hysteresis_pct < 0 or self.min_dwell_s < 0:
            problems.append("hysteresis and dwell must be >= 0")
        if self.history_size < 1:
            problems.append("history_size must be >= 1")
        if problems:
            raise ValueError("bad governor thresholds: " + "; ".join(problems))

    @classmethod
    def help(cls) -> dict[str, str]:
        """Help text per field, for the CLI and the settings documentation."""
        return {f.name: str(f.metadata.get("help", "")) for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class Signal:
    """One known reading judged against the thresholds."""

    key: str
    #: Level this reading asks for now (entry thresholds).
    level: State
    #: Level this reading still holds the box at (exit thresholds = entry minus hysteresis).
    hold: State
    text: str


@dataclass(frozen=True)
class Transition:
    """A state change and why it happened."""

    from_state: State
    to_state: State
    at: float
    reason: str
    snapshot_time: float

    def __str__(self) -> str:
        return f"{self.from_state} -> {self.to_state}: {self.reason}"


def _temp_signal(key: str, label: str, t: float, constrained: float, critical: float, hyst: float) -> Signal:
    level = State.CRITICAL if t >= critical else State.CONSTRAINED if t >= constrained else State.NORMAL
    hold = (State.CRITICAL if t >= critical - hyst else State.CONSTRAINED if t >= constrained - hyst
            else State.NORMAL)
    text = f"{label} {t:.1f} °C (constrained at {constrained:g}, critical at {critical:g})"
    return Signal(key, level, hold, text)


def signals(snapshot: Snapshot, th: GovernorThresholds) -> list[Signal]:
    """The known, plausible readings of `snapshot` judged against `th`."""
    out: list[Signal] = []
    if plausible_temp(snapshot.cpu_temp_c) and snapshot.cpu_temp_c is not None:
        out.append(_temp_signal("cpu_temp", "CPU temperature", snapshot.cpu_temp_c,
                                th.cpu_constrained_c, th.cpu_critical_c, th.temp_hysteresis_c))
    for g in snapshot.gpus or ():
        if plausible_temp(g.temperature_c) and g.temperature_c is not None:
            out.append(_temp_signal(f"gpu{g.index}_temp", f"GPU {g.index} temperature", g.temperature_c,
                                    th.gpu_constrained_c, th.gpu_critical_c, th.temp_hysteresis_c))
        if g.throttle_reasons is not None:
            active = sorted(set(g.throttle_reasons) & set(th.throttle_constrained_reasons))
            lvl = State.CONSTRAINED if active else State.NORMAL
            text = (f"GPU {g.index} throttling ({', '.join(active)})" if active
                    else f"GPU {g.index} not throttling")
            out.append(Signal(f"gpu{g.index}_throttle", lvl, lvl, text))
    total, avail = snapshot.ram_total_bytes, snapshot.ram_available_bytes
    if total and avail is not None and 0 <= avail <= total:
        pct = 100.0 * avail / total
        cons, crit, h = th.ram_constrained_available_pct, th.ram_critical_available_pct, th.ram_hysteresis_pct
        level = State.CRITICAL if pct <= crit else State.CONSTRAINED if pct <= cons else State.NORMAL
        hold = State.CRITICAL if pct < crit + h else State.CONSTRAINED if pct < cons + h else State.NORMAL
        out.append(Signal("ram", level, hold, f"available RAM {pct:.1f}% of {total / 2**30:.1f} GiB "
                                              f"(constrained at {cons:g}%, critical at {crit:g}%)"))
    return out


class GovernorStateMachine:
    """Pure state machine: feed it snapshots and times, it tells you when the state changes."""

    def __init__(self, thresholds: GovernorThresholds | None = None, *,
                 initial: State = State.NORMAL) -> None:
        self.thresholds = thresholds or GovernorThresholds()
        self.state = initial
        self.entered_at: float | None = None
        self._clear_since: float | None = None
        self._holders: set[str] = set()
        self._history: deque[Transition] = deque(maxlen=self.thresholds.history_size)

    @property
    def history(self) -> tuple[Transition, ...]:
        """Most recent transitions, oldest first (bounded by thresholds.history_size)."""
        return tuple(self._history)

    def _move(self, to: State, now: float, reason: str, snapshot: Snapshot, sigs: list[Signal]) -> Transition:
        tr = Transition(self.state, to, now, reason, snapshot.time)
        self.state = to
        self.entered_at = now
        # Readings that held the box above normal during this episode; all must be known to descend.
        self._holders = set() if to == State.NORMAL else self._holders | {
            s.key for s in sigs if s.hold > State.NORMAL}
        # A descent on readings that are already clear of the next level too starts that dwell now.
        clear_now = to < tr.from_state and max((s.hold for s in sigs), default=State.NORMAL) < to
        self._clear_since = now if clear_now else None
        self._history.append(tr)
        log.info("governor %s", tr)
        return tr

    def update(self, snapshot: Snapshot, now: float) -> Transition | None:
        """Judge one snapshot taken at `now` (monotonic seconds); return the transition, if any."""
        if self.entered_at is None:
            self.entered_at = now
        sigs = signals(snapshot, self.thresholds)
        level = max((s.level for s in sigs), default=State.NORMAL)
        if level > self.state:
            why = "; ".join(s.text for s in sigs if s.level == level)
            return self._move(level, now, why, snapshot, sigs)
        seen = {s.key for s in sigs}
        self._holders |= {s.key for s in sigs if s.hold > State.NORMAL}
        hold = max((s.hold for s in sigs), default=State.NORMAL)
        missing = self._holders - seen
        if self.state == State.NORMAL or hold >= self.state or missing:
            # Still held up, or cannot tell: a reading that held the state is unknown now.
            self._clear_since = None
            return None
        if self._clear_since is None:
            self._clear_since = now
        dwell = self.thresholds.min_dwell_s
        if now - self._clear_since < dwell or now - self.entered_at < dwell:
            return None
        to = State(self.state - 1)
        clear = "; ".join(s.text for s in sigs) or "no readings"
        why = f"readings below the {self.state} exit levels for {now - self._clear_since:.0f} s: {clear}"
        return self._move(to, now, why, snapshot, sigs)


TransitionCallback = Callable[[Transition, Snapshot], Awaitable[None]]


class Governor:
    """Runs the state machine every `interval_s` on fresh snapshots and reports transitions."""

    def __init__(self, prober: Prober, thresholds: GovernorThresholds | None = None, *,
                 interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.prober = prober
        self.machine = GovernorStateMachine(thresholds)
        self.interval_s = interval_s
        self._clock = clock
        self._callbacks: list[TransitionCallback] = []
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._started_wall: float | None = None
        self._own_cpu = 0.0
        self._failing = False
        self.last_snapshot: Snapshot | None = None
        self.ticks = 0

    @property
    def state(self) -> State:
        """Current state."""
        return self.machine.state

    def on_transition(self, callback: TransitionCallback) -> None:
        """Register an async callback called with (transition, snapshot) on every state change."""
        self._callbacks.append(callback)

    @property
    def cpu_seconds(self) -> float:
        """CPU time spent by the governor: probe reads (executor thread) plus state-machine updates."""
        return self.prober.read_cpu_seconds + self._own_cpu

    @property
    def cpu_percent(self) -> float | None:
        """Governor CPU time as a percentage of one core since start(); None before start."""
        if self._started_wall is None:
            return None
        elapsed = time.monotonic() - self._started_wall
        return 100.0 * self.cpu_seconds / elapsed if elapsed > 0 else None

    async def tick(self) -> Transition | None:
        """Take one snapshot, update the state, run callbacks on a transition."""
        snap = await self.prober.snapshot()
        t0 = time.thread_time()
        tr = self.machine.update(snap, self._clock())
        self.last_snapshot = snap
        self.ticks += 1
        self._own_cpu += time.thread_time() - t0
        if tr is not None:
            for cb in list(self._callbacks):
                try:
                    await cb(tr, snap)
                except Exception:
                    log.exception("governor transition callback %r failed", cb)
        return tr

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.tick()
                if self._failing:
                    self._failing = False
                    log.info("governor tick works again")
            except Exception:
                if not self._failing:
                    self._failing = True
                    log.exception("governor tick failed (will keep trying every %.1f s)", self.interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.interval_s)

    async def start(self) -> None:
        """Start the loop (the first tick runs at once)."""
        if self._task is not None:
            return
        self._stop.clear()
        self._started_wall = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="atoll-governor")

    async def stop(self) -> None:
        """Stop the loop and wait for the current tick to finish."""
        if self._task is None:
            return
        self._stop.set()
        task, self._task = self._task, None
        await task

    def status(self) -> dict[str, Any]:
        """JSON-able status for the API: state, since, last transitions, CPU cost."""
        return {
            "state": str(self.state),
            "since": self.machine.entered_at,
            "ticks": self.ticks,
            "cpu_percent": self.cpu_percent,
            "history": [{"from": str(t.from_state), "to": str(t.to_state), "at": t.at, "reason": t.reason}
                        for t in self.machine.history[-10:]],
            "snapshot": self.last_snapshot.to_json() if self.last_snapshot else None,
        }
