"""Undo a failed or interrupted import, and collect what no kept release references.

Kept: the releases `current` and `previous` in sync-state.json, their blobs, and any
blob the issue-2 catalog (catalog.json) still lists.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

from runtime.store import DIGEST_RE, ModelStore
from sync.state import SyncState, current_target, release_by_sequence, releases_dir, switch_current

log = logging.getLogger(__name__)


def kept_digests(state_dir: Path, st: SyncState) -> set[str]:
    """Digests referenced by the current and previous release and by catalog.json."""
    keep: set[str] = set()
    for seq in (st.current, st.previous):
        rel = release_by_sequence(state_dir, seq)
        if rel is not None:
            keep |= rel.blobs
    with contextlib.suppress(FileNotFoundError, ValueError, AttributeError, TypeError):
        cat = json.loads((state_dir / "catalog.json").read_text())
        for entry in cat.get("families", {}).values():
            keep |= {v["digest"] for v in entry.get("variants", [])}
    return keep


def _clean_staging(state_dir: Path, *, all_entries: bool) -> None:
    staging = ModelStore(state_dir).staging_dir
    if not staging.is_dir():
        return
    for p in staging.iterdir():
        if p.name.startswith("ingest-") and p.is_file():
            p.unlink(missing_ok=True)
        elif all_entries and p.name.startswith("tar-") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def undo_import(state_dir: Path, sequence: int, st: SyncState, *, added: list[str] | None) -> None:
    """Point `current` back at st.current and remove what the import of `sequence` created."""
    if current_target(state_dir) != st.current:
        switch_current(state_dir, st.current)
    rdir = releases_dir(state_dir)
    if sequence not in (st.current, st.previous):
        shutil.rmtree(rdir / str(sequence), ignore_errors=True)
    shutil.rmtree(rdir / f".{sequence}.tmp", ignore_errors=True)
    (state_dir / ".current.tmp").unlink(missing_ok=True)
    _clean_staging(state_dir, all_entries=False)
    if added:
        keep = kept_digests(state_dir, st)
        store = ModelStore(state_dir)
        for d in added:
            if d not in keep:
                store.blob_path(d).unlink(missing_ok=True)
    log.info("undid import of sequence %d; current is %s", sequence, st.current)


def collect_garbage(state_dir: Path, st: SyncState, *, at_startup: bool = False) -> list[str]:
    """Remove releases other than current/previous, unreferenced blobs and staging leftovers."""
    removed: list[str] = []
    rdir = releases_dir(state_dir)
    if rdir.is_dir():
        keep_rel = {str(s) for s in (st.current, st.previous) if s is not None}
        for p in rdir.iterdir():
            if p.name not in keep_rel:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(f"releases/{p.name}")
    keep = kept_digests(state_dir, st)
    store = ModelStore(state_dir)
    if store.blobs_dir.is_dir():
        for p in store.blobs_dir.iterdir():
            d = p.name.removeprefix("sha256-")
            if p.name.startswith("sha256-") and DIGEST_RE.fullmatch(d) and d not in keep:
                p.unlink(missing_ok=True)
                removed.append(f"blobs/{p.name}")
    _clean_staging(state_dir, all_entries=at_startup)
    (state_dir / ".current.tmp").unlink(missing_ok=True)
    if removed:
        log.info("sync garbage collection removed %s", removed)
    return removed
