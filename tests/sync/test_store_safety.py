"""Nothing the box holds is lost: garbage collection proves blobs unreferenced, one
cross-process store lock, and every import failure is recorded (issue 7 items 1, 2, 9)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.store import ModelStore
from sync.errors import ImportFailed
from sync.recovery import collect_garbage
from sync.state import Release, SyncState, read_current_release
from tests.sync.conftest import Box
from tests.sync.helpers import snapshot, write_gguf

ROOT = Path(__file__).resolve().parents[2]


def _add_local(box: Box, name: str = "local") -> str:
    """A model added with `atoll models add`'s code; return its digest."""
    v = ModelStore(box.state_dir).add_file(box.gguf(name), family=name)
    return v.digest


@pytest.mark.parametrize("damage", ["not-json", "no-families", "variant-without-digest", "directory"])
async def test_unreadable_catalog_makes_gc_delete_nothing(installed: Box, damage: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    box = installed
    digest = _add_local(box)
    cat = box.state_dir / "catalog.json"
    doc = json.loads(cat.read_text())
    if damage == "not-json":
        cat.write_text(cat.read_text()[:-5])
    elif damage == "no-families":
        cat.write_text("{}")
    elif damage == "variant-without-digest":
        doc["families"]["local"]["variants"][0].pop("digest")
        cat.write_text(json.dumps(doc))
    else:
        cat.unlink()
        cat.mkdir()
    (box.state_dir / "releases" / "77").mkdir()  # a stray release GC would remove if it could
    before = snapshot(box.state_dir / "blobs"), snapshot(box.state_dir / "releases")
    st = SyncState.load(box.state_dir)
    with caplog.at_level(logging.ERROR, logger="sync.recovery"):
        assert collect_garbage(box.state_dir, st, at_startup=True) == []
        box.manager().recover()
        # an import's own clean-up (it installs: the new release needs nothing from the catalog)
        assert (await box.manager().import_bundle(box.bundle("b2", 2))).status == "installed"
    assert ModelStore(box.state_dir).has_blob(digest)
    assert before[0].items() <= snapshot(box.state_dir / "blobs").items()
    assert (box.state_dir / "releases" / "77").is_dir()
    assert "catalog.json cannot be read" in caplog.text and "deleted no release and no blob" in caplog.text


@pytest.mark.parametrize("damage", ["missing", "not-json", "bad-digest"])
async def test_unreadable_release_manifest_makes_gc_delete_nothing(installed: Box, damage: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    box = installed
    assert (await box.manager().import_bundle(box.bundle("b2", 2))).status == "installed"
    prev = box.state_dir / "releases" / "1" / "manifest.json"
    if damage == "missing":
        prev.unlink()
    elif damage == "not-json":
        prev.write_text("{")
    else:
        doc = json.loads(prev.read_text())
        doc["policy"] = "../../etc/passwd"
        prev.write_text(json.dumps(doc))
    before = snapshot(box.state_dir)
    with caplog.at_level(logging.ERROR, logger="sync.recovery"):
        collect_garbage(box.state_dir, SyncState.load(box.state_dir), at_startup=True)
        box.manager().recover()
    assert snapshot(box.state_dir) == before
    assert "release 1's manifest" in caplog.text and "deleted no release and no blob" in caplog.text


async def test_gc_still_collects_what_it_can_prove_unreferenced(installed: Box) -> None:
    box = installed
    digest = _add_local(box)
    stray = ModelStore(box.state_dir).blob_path("ab" * 32)
    stray.write_bytes(b"orphan")
    removed = collect_garbage(box.state_dir, SyncState.load(box.state_dir))
    assert removed == [f"blobs/{stray.name}"]
    assert ModelStore(box.state_dir).has_blob(digest)


def test_add_and_import_in_two_processes_lose_nothing(installed: Box) -> None:
    """`atoll models add` and `atoll import` at once, many times: every added blob survives."""
    box = installed
    n = 30
    files = [write_gguf(box.work / f"add{i}.gguf", salt=f"add{i}", n_floats=1 << 20) for i in range(n)]
    bundles = [box.bundle(f"r{i}", i + 2) for i in range(n)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    add = subprocess.Popen([sys.executable, "-m", "tests.sync.race_child", "add", str(box.state_dir),
                            *map(str, files)], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    imp = subprocess.Popen([sys.executable, "-m", "tests.sync.race_child", "import", str(box.state_dir),
                            *map(str, bundles)], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    add_err, imp_err = add.communicate(timeout=300)[1], imp.communicate(timeout=300)[1]
    assert (add.returncode, imp.returncode) == (0, 0), add_err + imp_err
    store = ModelStore(box.state_dir)
    fams = store.families()
    assert sorted(fams) == sorted(f"local{i}" for i in range(n))
    assert all(v.broken is None for vs in fams.values() for v in vs), fams
    rel = read_current_release(box.state_dir)
    assert rel is not None and rel.sequence == n + 1
    assert all(store.has_blob(d) for d in rel.blobs)
    assert [p for p in store.staging_dir.iterdir()] == []


@pytest.mark.parametrize("version", ["0+source", "0.2.0rc1", "1.0+site", "0.1.1.dev3"])
async def test_pep440_daemon_versions_import(box: Box, version: str) -> None:
    res = await box.manager(config=box.config(daemon_version=version)).import_bundle(box.bundle("b1", 1))
    assert res.status == "installed"


async def test_daemon_older_than_bundle_is_refused_and_recorded(box: Box) -> None:
    mgr = box.manager(config=box.config(daemon_version="0.0.1rc1"))
    with pytest.raises(Exception) as ei:
        await mgr.import_bundle(box.bundle("b1", 1))
    assert getattr(ei.value, "code", None) == "daemon_too_old"
    assert mgr.progress.phase == "failed" and box.audit_log[-1][0] == "sync.import.rejected"


@pytest.mark.parametrize("where", ["verified", "health"])
async def test_unexpected_exception_is_a_recorded_failure(installed: Box, where: str) -> None:
    """An exception no step expected ends as an audited failure, progress reset, no internal text."""
    box = installed

    def checkpoint(step: str) -> None:
        if where == "verified" and step == "verified":
            raise RuntimeError("secret internal detail")

    async def health(release: Release, store: ModelStore) -> None:
        if where == "health":
            raise KeyError("secret internal detail")

    mgr = box.manager(checkpoint=checkpoint, health_checks=(health,))
    before = snapshot(box.state_dir)
    with pytest.raises(ImportFailed) as ei:
        await mgr.import_bundle(box.bundle("b2", 2))
    assert "secret" not in ei.value.message
    assert mgr.progress.phase == "failed" and mgr.progress.error and "secret" not in mgr.progress.error
    event, detail = box.audit_log[-1]
    assert event == "sync.import.failed" and "secret" not in json.dumps(detail)
    after = snapshot(box.state_dir)
    after.pop("trust/.root.json.tmp", None)
    assert {k: v for k, v in after.items() if not k.startswith(".")} == \
        {k: v for k, v in before.items() if not k.startswith(".")}
    # and the box still imports
    assert (await box.manager().import_bundle(box.bundle("b3", 3))).status == "installed"
