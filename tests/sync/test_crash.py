"""Kill the importing process at every step; after restart the box is on the old release or the new."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sync.state import SyncState, read_current_release, release_by_sequence
from tests.sync.conftest import Box
from tests.sync.helpers import snapshot

ROOT = Path(__file__).resolve().parents[2]
STEPS_OLD = ["verified", "pending", "blob:0", "mid-copy", "blob:1", "release_built", "health_checked",
             "switched"]
STEPS_NEW = ["committed", "cleaned"]


def run_child(state: Path, stick: Path, step: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run tests/sync/crash_child.py; return the finished process."""
    cmd = [sys.executable, "-m", "tests.sync.crash_child", str(state), str(stick), step, *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def assert_consistent(box: Box, expect: int) -> None:
    """current == committed state, releases and blobs exactly those of current and previous."""
    st = SyncState.load(box.state_dir)
    assert st.pending is None and st.current == expect
    cur = read_current_release(box.state_dir)
    assert cur is not None and cur.sequence == expect
    keep = {s for s in (st.current, st.previous) if s is not None}
    assert {p.name for p in (box.state_dir / "releases").iterdir()} == {str(s) for s in keep}
    want: set[str] = set()
    for s in keep:
        rel = release_by_sequence(box.state_dir, s)
        assert rel is not None
        want |= rel.blobs
    assert {p.name.removeprefix("sha256-") for p in (box.state_dir / "blobs").iterdir()} == want
    assert list((box.state_dir / "staging").iterdir()) == []


@pytest.mark.parametrize("step", STEPS_OLD + STEPS_NEW)
async def test_sigkill_at_each_step(installed: Box, step: str) -> None:
    box = installed
    stick = box.bundle("b2", 2, {"tiny": [box.gguf("big", n_floats=3_000_000)], "tiny2": [box.gguf("small")]})
    before = snapshot(box.state_dir)
    proc = run_child(box.state_dir, stick, step)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    what = box.manager().recover()
    if step in STEPS_OLD:
        assert_consistent(box, 1)
        assert snapshot(box.state_dir) == before  # byte for byte: nothing of the import remains
        assert (what is not None) == (step != "verified")
        assert (await box.manager().import_bundle(stick)).status == "installed"  # and it can be retried
    else:
        assert_consistent(box, 2)
    assert_consistent(box, 2)


async def test_disk_full_during_copy_via_rlimit(installed: Box) -> None:
    box = installed
    stick = box.bundle("b2", 2, {"tiny": [box.gguf("big", n_floats=3_000_000)]})
    before = snapshot(box.state_dir)
    proc = run_child(box.state_dir, stick, "never", str(1 << 20))
    assert proc.returncode == 3 and proc.stdout.strip() == "disk_full", proc.stderr
    assert snapshot(box.state_dir) == before


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A 2 MiB tmpfs, if this process may mount one."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                                           capture_output=True, check=False).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_disk_full_during_copy_on_tmpfs(box: Box, tiny_tmpfs: Path) -> None:
    import shutil

    from sync.errors import ImportFailed

    state = tiny_tmpfs / "state"
    shutil.copytree(box.state_dir, state)
    box.state_dir = state
    await box.manager().import_bundle(box.bundle("b1", 1))
    stick = box.bundle("b2", 2, {"tiny": [box.gguf("big", n_floats=200_000)]})  # 800 kB: fits when checked
    before = snapshot(state)
    filler = tiny_tmpfs / "filler"

    def fill(p: object) -> None:  # another writer takes the space once the copy has started
        if getattr(p, "phase", "") == "copying" and not filler.exists():
            with filler.open("wb") as f, __import__("contextlib").suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)

    with pytest.raises(ImportFailed) as ei:
        await box.manager(on_progress=fill).import_bundle(stick)
    assert ei.value.code == "disk_full"
    filler.unlink()
    assert snapshot(state) == before


async def test_stick_removed_mid_copy(installed: Box) -> None:
    import shutil

    from sync.errors import BundleRejected

    box = installed
    stick = box.bundle("b2", 2, {"tiny": [box.gguf("big", n_floats=3_000_000)]})
    before = snapshot(box.state_dir)

    def pull(p: object) -> None:
        if getattr(p, "phase", "") == "copying" and (stick / "ATOLL").exists():
            shutil.rmtree(stick / "ATOLL")

    with pytest.raises(BundleRejected) as ei:
        await box.manager(on_progress=pull).import_bundle(stick)
    assert ei.value.code == "missing_blob"
    assert snapshot(box.state_dir) == before


async def test_stick_truncated_mid_copy(installed: Box) -> None:
    from sync.errors import BundleRejected

    box = installed
    stick = box.bundle("b2", 2, {"tiny": [box.gguf("big", n_floats=3_000_000)]})
    before = snapshot(box.state_dir)
    big = max((stick / "ATOLL" / "blobs").iterdir(), key=lambda p: p.stat().st_size)

    def cut(p: object) -> None:
        if getattr(p, "current_file", "") == f"blobs/{big.name}" and big.stat().st_size > 1000:
            os.truncate(big, 1000)

    with pytest.raises(BundleRejected) as ei:
        await box.manager(on_progress=cut).import_bundle(stick)
    assert ei.value.code == "blob_size_mismatch"
    assert snapshot(box.state_dir) == before


async def test_cancelled_import_leaves_old_release(installed: Box) -> None:
    import asyncio

    box = installed
    stick = box.bundle("b2", 2, {"tiny": [box.gguf("big", n_floats=3_000_000)]})
    before = snapshot(box.state_dir)
    loop = asyncio.get_running_loop()
    task: asyncio.Task[object] | None = None

    def cancel_mid_copy(p: object) -> None:
        if getattr(p, "phase", "") == "copying" and getattr(p, "bytes_done", 0) > 0 and task is not None:
            loop.call_soon_threadsafe(task.cancel)

    task = asyncio.ensure_future(box.manager(on_progress=cancel_mid_copy).import_bundle(stick))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert snapshot(box.state_dir) == before


async def test_sigkill_after_root_rotation_written(installed: Box) -> None:
    """Documented window: the rotated root (signed by the old keys) stays trusted, the release is old."""
    import json

    from tests.sync.helpers import write_json

    box = installed
    kr = box.kr
    new_root, new_bundle = kr.new_keys("root2", 3), kr.new_keys("bundle2", 3)
    rp = write_json(box.work / "2.root.json",
                    kr.root_doc(2, new_root, new_bundle, signers=kr.root_keys[:2] + new_root[:2]))
    stick = box.bundle("b2", 2, signers=new_bundle[:2], root_chain=(rp,))
    proc = run_child(box.state_dir, stick, "root_written")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    box.manager().recover()
    assert_consistent(box, 1)
    assert json.loads((box.state_dir / "trust" / "root.json").read_text())["signed"]["version"] == 2
    assert (await box.manager().import_bundle(stick)).status == "installed"
    assert_consistent(box, 2)
