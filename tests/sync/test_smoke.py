"""Happy paths: install, upgrade, already installed, rollback, release layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sync.state import SyncState, read_current_release, release_by_sequence
from tests.sync.conftest import Box


async def test_first_import_installs_release(installed: Box) -> None:
    sd = installed.state_dir
    rel = read_current_release(sd)
    assert rel is not None and rel.sequence == 1
    assert os.readlink(sd / "current") == "releases/1"
    assert set(rel.families) == {"tiny"}
    for d in rel.blobs:
        assert (sd / "blobs" / f"sha256-{d}").is_file()
    st = SyncState.load(sd)
    assert (st.current, st.previous, st.highest_sequence, st.pending) == (1, None, 1, None)
    assert [e for e, _ in installed.audit_log][-1] == "sync.import.installed"


async def test_upgrade_keeps_previous_and_collects_older(installed: Box) -> None:
    box = installed
    await box.manager().import_bundle(box.bundle("b2", 2))
    await box.manager().import_bundle(box.bundle("b3", 3))
    st = SyncState.load(box.state_dir)
    assert (st.current, st.previous, st.highest_sequence) == (3, 2, 3)
    assert sorted(p.name for p in (box.state_dir / "releases").iterdir()) == ["2", "3"]
    blobs = {p.name.removeprefix("sha256-") for p in (box.state_dir / "blobs").iterdir()}
    r2 = release_by_sequence(box.state_dir, 2)
    r3 = release_by_sequence(box.state_dir, 3)
    assert r2 is not None and r3 is not None
    assert blobs == r2.blobs | r3.blobs


async def test_same_bundle_twice_is_a_noop(installed: Box) -> None:
    res = await installed.manager().import_bundle(installed.work / "b1")
    assert res.status == "already_installed"


async def test_rollback_returns_to_previous(installed: Box) -> None:
    box = installed
    await box.manager().import_bundle(box.bundle("b2", 2))
    rel = await box.manager().rollback()
    assert rel.sequence == 1
    assert os.readlink(box.state_dir / "current") == "releases/1"
    st = SyncState.load(box.state_dir)
    assert (st.current, st.previous, st.highest_sequence) == (1, 2, 2)
    # the rolled-back bundle cannot be re-imported as new, an older one neither
    assert (await box.manager().import_bundle(box.work / "b2")).status == "already_installed"


async def test_rollback_without_previous_is_refused(installed: Box) -> None:
    import pytest

    from sync.errors import RollbackUnavailable

    with pytest.raises(RollbackUnavailable):
        await installed.manager().rollback()


async def test_blob_shared_with_installed_release_need_not_be_on_stick(installed: Box) -> None:
    box = installed
    gguf = box.work / "b1-m.gguf"
    stick = box.bundle("b2", 2, {"tiny": [gguf], "tiny2": [box.gguf("new")]})
    from runtime.store import ModelStore

    digest = ModelStore(box.state_dir).ingest(gguf.open("rb"))[0]  # already present: a no-op rename
    (stick / "ATOLL" / "blobs" / f"sha256-{digest}").unlink()
    res = await box.manager().import_bundle(stick)
    assert res.status == "installed" and res.files_copied == 1


async def test_progress_reports_phases_and_bytes(installed: Box) -> None:
    box = installed
    seen: list[tuple[str, int, int]] = []
    mgr = box.manager(on_progress=lambda p: seen.append((p.phase, p.bytes_done, p.files_done)))
    await mgr.import_bundle(box.bundle("b2", 2))
    phases = [s[0] for s in seen]
    for ph in ("verifying", "copying", "building", "health_check", "switching", "committing", "done"):
        assert ph in phases
    assert mgr.progress.bytes_done == mgr.progress.bytes_total > 0
    assert mgr.progress.files_done == mgr.progress.files_total == 2


async def test_real_model_bundle(box: Box, smollm2_path: Path) -> None:
    stick = box.bundle("real", 1, {"smollm2-135m": [smollm2_path]})
    res = await box.manager().import_bundle(stick)
    assert res.status == "installed" and res.bytes_copied > 90_000_000
    rel = read_current_release(box.state_dir)
    assert rel is not None
    (variant,) = rel.families["smollm2-135m"]
    assert variant["quant"] == "Q4_1" and variant["source_name"] == smollm2_path.name
    assert (box.state_dir / "blobs" / f"sha256-{variant['digest']}").stat().st_size == smollm2_path.stat().st_size


async def test_stick_is_only_read(box: Box) -> None:
    from tests.sync.helpers import snapshot

    stick = box.bundle("b1", 1)
    before = snapshot(stick)
    await box.manager().import_bundle(stick)
    assert snapshot(stick) == before


async def test_damaged_blob_in_store_is_recopied_not_trusted(installed: Box) -> None:
    box = installed
    gguf = box.work / "b1-m.gguf"
    rel1 = read_current_release(box.state_dir)
    assert rel1 is not None
    (digest,) = [v["digest"] for v in rel1.families["tiny"]]
    blob = box.state_dir / "blobs" / f"sha256-{digest}"
    blob.write_bytes(b"rot" + blob.read_bytes()[3:])  # bit rot in the store
    stick = box.bundle("b2", 2, {"tiny": [gguf]})
    res = await box.manager().import_bundle(stick)
    assert res.files_copied == 1 and res.status == "installed"
    assert blob.read_bytes() == gguf.read_bytes()


async def test_damaged_blob_missing_from_stick_is_refused(installed: Box) -> None:
    from sync.errors import BundleRejected

    box = installed
    gguf = box.work / "b1-m.gguf"
    rel1 = read_current_release(box.state_dir)
    assert rel1 is not None
    (digest,) = [v["digest"] for v in rel1.families["tiny"]]
    blob = box.state_dir / "blobs" / f"sha256-{digest}"
    blob.write_bytes(b"rot" + blob.read_bytes()[3:])
    stick = box.bundle("b2", 2, {"tiny": [gguf]})
    (stick / "ATOLL" / "blobs" / f"sha256-{digest}").unlink()
    with pytest.raises(BundleRejected) as ei:
        await box.manager().import_bundle(stick)
    assert ei.value.code == "missing_blob"
