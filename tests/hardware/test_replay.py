from __future__ import annotations

from pathlib import Path

import pytest

from hardware.probe import Prober
from hardware.replay import (
    ReplayError,
    ReplaySource,
    bundled_timeline,
    bundled_timelines,
    load_timeline,
    open_replay,
)

from .fakes import Clock

LINE0 = '{"t": 0, "cpu_temp_c": 50.0, "ram_total_bytes": 1000, "ram_available_bytes": 600, "gpus": []}'
LINE1 = '{"t": 10, "cpu_temp_c": 70.5, "ram_total_bytes": 1000, "ram_available_bytes": 400}'


def source(lines: list[str], clock: Clock, **kw: object) -> ReplaySource:
    return ReplaySource(load_timeline(lines, "test.jsonl"), name="test.jsonl", clock=clock, **kw)  # type: ignore[arg-type]


def test_bundled_timelines_are_shipped_and_valid() -> None:
    assert {"overheat.jsonl", "memory-pressure.jsonl"} <= set(bundled_timelines())
    for name in bundled_timelines():
        src = ReplaySource.from_file(bundled_timeline(name), clock=Clock(0.0), start=0.0)
        assert src.duration >= 300
        assert src.read().source == f"replay:{name}"


def test_unknown_bundled_timeline_names_the_available_ones() -> None:
    with pytest.raises(FileNotFoundError, match=r"overheat\.jsonl"):
        bundled_timeline("nope.jsonl")


def test_latest_line_at_or_before_now_wins() -> None:
    clock = Clock(100.0)
    src = source(["# comment", "", LINE0, LINE1], clock)
    assert src.read().cpu_temp_c == 50.0  # first read starts the replay
    clock.t = 109.9
    assert src.read().cpu_temp_c == 50.0
    clock.t = 110.0
    snap = src.read()
    assert snap.cpu_temp_c == 70.5 and snap.ram_available_bytes == 400 and snap.time == 110.0
    assert snap.gpus is None  # absent on this line: unknown, not carried over
    clock.t = 10_000.0
    assert src.read().cpu_temp_c == 70.5  # the last line holds


def test_speed_and_explicit_start() -> None:
    clock = Clock(5.0)
    src = source([LINE0, LINE1], clock, start=0.0, speed=2.0)
    assert src.read().cpu_temp_c == 70.5  # 5 s at double speed = t 10


def test_replayed_nonsense_is_sanitized_by_the_prober() -> None:
    src = source(['{"t": 0, "cpu_temp_c": 1000, "ram_total_bytes": 10, "ram_available_bytes": 20}'], Clock())
    snap = Prober(src).read()
    assert snap.cpu_temp_c is None and snap.ram_available_bytes is None and snap.ram_total_bytes == 10


@pytest.mark.parametrize(("lines", "message"), [
    ([LINE0, '{"t": 5, "cpu_temp_c": 50'], r"test.jsonl:2: not valid JSON"),
    ([LINE0, "# c", '{"t": 5, "cpu_temp": 50}'], r"test.jsonl:3: unknown keys \['cpu_temp'\]"),
    (['{"cpu_temp_c": 50}'], r"test.jsonl:1: missing 't'"),
    ([LINE1, LINE0], r"test.jsonl:2: t=0.0 goes back in time"),
    (['{"t": -1}'], r"test.jsonl:1: 't' must be a number >= 0"),
    (['{"t": 0, "cpu_temp_c": "hot"}'], r"test.jsonl:1: cpu_temp_c must be a number"),
    (['{"t": 0, "ram_total_bytes": 1.5}'], r"test.jsonl:1: ram_total_bytes must be an integer"),
    (['{"t": 0, "gpus": [{"temp": 3}]}'], r"test.jsonl:1: gpus\[0\] has unknown keys"),
    (['{"t": 0, "gpus": [{"throttle_reasons": "hot"}]}'], r"test.jsonl:1: gpus\[0\].throttle_reasons"),
    (['{"t": 0, "cpu_temps": [[1, 2]]}'], r"test.jsonl:1: cpu_temps must be a list"),
    (["[1, 2]"], r"test.jsonl:1: each line must be a JSON object"),
    (["# only comments"], r"test.jsonl: timeline has no readings"),
])
def test_bad_lines_are_errors_with_line_numbers(lines: list[str], message: str) -> None:
    with pytest.raises(ReplayError, match=message):
        load_timeline(lines, "test.jsonl")


def test_unreadable_file_is_a_replay_error(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="cannot read timeline"):
        ReplaySource.from_file(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(LINE0 + "\n{oops\n")
    with pytest.raises(ReplayError, match=r"bad.jsonl:2:"):
        ReplaySource.from_file(bad)


def test_open_replay_takes_a_path_or_a_bundled_name(tmp_path: Path) -> None:
    f = tmp_path / "mine.jsonl"
    f.write_text(LINE0 + "\n")
    assert open_replay(str(f), clock=Clock()).read().cpu_temp_c == 50.0
    assert open_replay("overheat", clock=Clock(), start=0.0).name == "overheat.jsonl"
    assert open_replay("memory-pressure.jsonl", clock=Clock(), start=0.0).name == "memory-pressure.jsonl"
    with pytest.raises(ReplayError, match="not a bundled timeline"):
        open_replay(str(tmp_path / "nope.jsonl"))
