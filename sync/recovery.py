"""Undo a failed or interrupted import, and collect what no kept release references.

Kept: the releases `current` and `previous` in sync-state.json, their blobs, and any
blob catalog.json (models added with `atoll models add`) lists.

Garbage collection deletes only what it can prove unreferenced: if the catalog or the
manifest of a kept release cannot be read, it deletes nothing and logs why
(`UnreadableReferences`). Every function here changes the store, so the caller holds
the store lock (`ModelStore.lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from runtime.store import DIGEST_RE, ModelStore, StoreError
from sync.state import SyncState, current_target, release_by_sequence, releases_dir, switch_current

log = logging.getLogger(__name__)

#: Staging entries a killed import or upload can leave: partial blob copies, uploaded tars,
#: the metadata read from a tar. Cleaned at start-up (all but those a live process holds,
#: `hold_entry`) and after a failed import (partial copies).
STAGING_PREFIXES = ("ingest-", "upload-", "tar-")


def _in_use(path: Path) -> bool:
    """Whether a live upload or tar import holds a flock on this staging entry (see `hold_entry`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold_entry(path: Path) -> Iterator[None]:
    """Mark a staging entry (file or directory) as in use for as long as the block runs."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


class UnreadableReferences(Exception):
    """A list of kept blobs (catalog or release manifest) cannot be read: nothing may be deleted."""


def kept_digests(state_dir: Path, st: SyncState) -> set[str]:
    """Digests referenced by the current and previous release and by catalog.json.

    Raises UnreadableReferences when any of them cannot be read, or a kept release is missing.
    """
    keep: set[str] = set()
    for seq in (st.current, st.previous):
        if seq is None:
            continue
        try:
            rel = release_by_sequence(state_dir, seq)
            if rel is None:
                raise FileNotFoundError(f"releases/{seq}/manifest.json is missing")
            digests = rel.blobs
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UnreadableReferences(f"release {seq}'s manifest cannot be read: {e}") from e
        if not all(isinstance(d, str) and DIGEST_RE.fullmatch(d) for d in digests):
            raise UnreadableReferences(f"release {seq}'s manifest lists a malformed digest")
        keep |= digests
    try:
        cat = ModelStore(state_dir).read_catalog()
        for fam, entry in cat["families"].items():
            for v in entry["variants"]:
                if not isinstance(v["digest"], str) or not DIGEST_RE.fullmatch(v["digest"]):
                    raise ValueError(f"family {fam} lists a malformed digest")
                keep.add(v["digest"])
    except (StoreError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise UnreadableReferences(f"catalog.json cannot be read: {getattr(e, 'message', e)}") from e
    return keep


def clean_staging(state_dir: Path, *, all_entries: bool) -> list[str]:
    """Remove partial copies from staging (all_entries: also uploads and tar metadata); return names."""
    staging = ModelStore(state_dir).staging_dir
    removed: list[str] = []
    if not staging.is_dir():
        return removed
    for p in staging.iterdir():
        if p.name.startswith("ingest-") and p.is_file():
            p.unlink(missing_ok=True)
        elif all_entries and p.name.startswith(STAGING_PREFIXES) and not _in_use(p):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        else:
            continue
        removed.append(f"staging/{p.name}")
    return removed


def undo_import(state_dir: Path, sequence: int, st: SyncState, *, added: list[str] | None) -> None:
    """Point `current` back at st.current and remove what the import of `sequence` created."""
    if current_target(state_dir) != st.current:
        switch_current(state_dir, st.current)
    rdir = releases_dir(state_dir)
    if sequence not in (st.current, st.previous):
        shutil.rmtree(rdir / str(sequence), ignore_errors=True)
    shutil.rmtree(rdir / f".{sequence}.tmp", ignore_errors=True)
    (state_dir / ".current.tmp").unlink(missing_ok=True)
    clean_staging(state_dir, all_entries=False)
    if added:
        try:
            keep = kept_digests(state_dir, st)
        except UnreadableReferences as e:
            log.error("not removing the %d blobs the failed import added: %s", len(added), e)
            keep = set(added)
        store = ModelStore(state_dir)
        for d in added:
            if d not in keep:
                store.blob_path(d).unlink(missing_ok=True)
    log.info("undid import of sequence %d; current is %s", sequence, st.current)


def collect_garbage(state_dir: Path, st: SyncState, *, at_startup: bool = False) -> list[str]:
    """Remove releases other than current/previous, unreferenced blobs and staging leftovers.

    Deletes no release and no blob when a kept reference cannot be read (logged as an error).
    """
    removed = clean_staging(state_dir, all_entries=at_startup)
    (state_dir / ".current.tmp").unlink(missing_ok=True)
    try:
        keep = kept_digests(state_dir, st)
    except UnreadableReferences as e:
        log.error("garbage collection deleted no release and no blob: %s", e)
        return removed
    rdir = releases_dir(state_dir)
    if rdir.is_dir():
        keep_rel = {str(s) for s in (st.current, st.previous) if s is not None}
        for p in rdir.iterdir():
            if p.name not in keep_rel:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(f"releases/{p.name}")
    store = ModelStore(state_dir)
    if store.blobs_dir.is_dir():
        for p in store.blobs_dir.iterdir():
            d = p.name.removeprefix("sha256-")
            if p.name.startswith("sha256-") and DIGEST_RE.fullmatch(d) and d not in keep:
                p.unlink(missing_ok=True)
                removed.append(f"blobs/{p.name}")
    if removed:
        log.info("sync garbage collection removed %s", removed)
    return removed
