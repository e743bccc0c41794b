"""The USB watcher: a bundle appearing under a media dir starts one import."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from sync.state import read_current_release
from sync.watch import UsbWatcher, find_bundles
from tests.sync.conftest import Box
from tests.sync.helpers import snapshot

# watchdog's inotify emitter warns when directories are created faster than it adds watches
pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")


async def _wait_for(pred, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_stick_appearing_triggers_one_import(installed: Box, tmp_path: Path) -> None:
    box = installed
    media = tmp_path / "media"
    media.mkdir()
    stick_src = box.bundle("b2", 2)
    stick_before = snapshot(stick_src)
    seen: list[Path] = []
    mgr = box.manager()

    sentinel = media / "SENTINEL"

    async def on_bundle(p: Path) -> None:
        seen.append(p)
        if p != sentinel:
            await mgr.import_bundle(p)

    w = UsbWatcher(on_bundle, [media, tmp_path / "absent"], settle_delays=(0.1, 0.5), debounce=0.2)
    await w.start()
    try:
        # a user dir, then the "mount": the stick's tree appears under it
        (media / "user").mkdir()
        shutil.copytree(stick_src, media / "user" / "STICK")
        # then a second bundle: its events queue behind every event of the copy, so once the watcher has
        # reported it and has nothing pending (no scan, timer or import), the copy's events have all been handled
        (sentinel / "ATOLL").mkdir(parents=True)
        (sentinel / "ATOLL" / "bundle.json").write_text("{}")
        await _wait_for(lambda: (r := read_current_release(box.state_dir)) is not None and r.sequence == 2)
        await _wait_for(lambda: sentinel in seen and not w.busy)
        assert sorted(seen) == [sentinel, media / "user" / "STICK"]  # the stick was imported once
    finally:
        await w.stop()
    assert snapshot(media / "user" / "STICK") == stick_before  # the stick is only read


async def test_bundle_present_at_start_is_found(installed: Box, tmp_path: Path) -> None:
    media = tmp_path / "media"
    shutil.copytree(installed.bundle("b2", 2), media / "STICK")
    seen: list[Path] = []

    async def on_bundle(p: Path) -> None:
        seen.append(p)

    w = UsbWatcher(on_bundle, [media], debounce=0.05)
    await w.start()
    await _wait_for(lambda: bool(seen))
    await w.stop()
    assert seen == [media / "STICK"]


async def test_failing_import_does_not_stop_the_watcher(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    calls: list[Path] = []

    async def on_bundle(p: Path) -> None:
        calls.append(p)
        raise RuntimeError("boom")

    w = UsbWatcher(on_bundle, [media], settle_delays=(0.1,), debounce=0.05)
    await w.start()
    for name in ("A", "B"):
        (media / name / "ATOLL").mkdir(parents=True)
        (media / name / "ATOLL" / "bundle.json").write_text("{}")
    await _wait_for(lambda: len(calls) == 2)
    await w.stop()


def test_find_bundles_depth_and_symlinks(tmp_path: Path) -> None:
    (tmp_path / "a" / "b" / "ATOLL").mkdir(parents=True)
    (tmp_path / "a" / "b" / "ATOLL" / "bundle.json").write_text("{}")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert find_bundles(tmp_path, 3) == [tmp_path / "a" / "b"]
    assert find_bundles(tmp_path, 1) == []
