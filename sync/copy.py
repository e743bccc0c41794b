"""Copy verified-listed blobs from a bundle into the store, hashing while copying.

Each source is opened with O_NOFOLLOW and must be a single-link regular file; the store
caps reading at size+1 bytes, fsyncs, renames into blobs/ and fsyncs the directory.
Blobs already in the store are re-hashed, not trusted.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from runtime.store import COPY_CHUNK, ModelStore, StoreError
from sync.errors import BundleRejected, ImportFailed
from sync.fsutil import open_regular
from sync.manifest import FileEntry
from sync.policy import MAX_POLICY_BYTES, parse_policy

log = logging.getLogger(__name__)

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


@dataclass
class Progress:
    """Where an import stands; read it any time (updated from a worker thread)."""

    phase: str = "idle"
    sequence: int | None = None
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    current_file: str | None = None
    error: str | None = None

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy for the admin API."""
        return asdict(self)


ProgressCallback = Callable[[Progress], None]


class _Tracked:
    """A reader that reports every chunk to the progress object and callback, and can be cancelled."""

    def __init__(self, src: BinaryIO, progress: Progress, notify: Callable[[], None],
                 cancel: threading.Event) -> None:
        self.src, self.progress, self.notify, self.cancel = src, progress, notify, cancel

    def readinto(self, view: memoryview) -> int:
        """Read into `view`, count the bytes, notify; refuse once cancelled."""
        if self.cancel.is_set():
            raise ImportFailed("the import was cancelled", code="cancelled")
        n = self.src.readinto(view)  # type: ignore[attr-defined]
        if n:
            self.progress.bytes_done += n
            self.notify()
        return int(n or 0)


def blob_is_valid(path: Path, entry: FileEntry) -> bool:
    """Re-hash a blob already in the store; True if size and digest match the listing."""
    try:
        fd = open_regular(path, what=str(path))
    except BundleRejected:
        return False
    h = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "rb") as f:
        while size <= entry.size and (chunk := f.read(COPY_CHUNK)):
            h.update(chunk)
            size += len(chunk)
    return size == entry.size and h.hexdigest() == entry.digest


#: Opens one listed blob of a bundle for reading (a file on a stick, a member of a tar);
#: raises BundleRejected (code missing_blob, unsafe_file, ...) when it cannot.
BlobOpener = Callable[[FileEntry], BinaryIO]


def dir_blobs(atoll_dir: Path) -> BlobOpener:
    """The opener for a bundle directory: ATOLL/blobs/sha256-<hex>, single-link regular files only."""
    blobs_dir = atoll_dir / "blobs"

    def open_blob(entry: FileEntry) -> BinaryIO:
        if blobs_dir.is_symlink():
            raise BundleRejected("ATOLL/blobs is a symlink", code="unsafe_file")
        name = f"blobs/sha256-{entry.digest}"
        try:
            fd = open_regular(blobs_dir / f"sha256-{entry.digest}", what=name)
        except BundleRejected as e:
            code = "missing_blob" if e.code == "missing_file" else e.code
            raise BundleRejected(e.message, code=code) from e
        return os.fdopen(fd, "rb")

    return open_blob


def copy_blob(store: ModelStore, open_blob: BlobOpener, entry: FileEntry, progress: Progress,
              notify: Callable[[], None], cancel: threading.Event) -> bool:
    """Bring one listed blob into the store; return True if it was copied (False: present and valid)."""
    dest = store.blob_path(entry.digest)
    name = f"blobs/sha256-{entry.digest}"
    progress.current_file = name
    if dest.exists():
        if blob_is_valid(dest, entry):
            progress.bytes_done += entry.size
            notify()
            return False
        log.warning("store blob %s is damaged; copying it again from the bundle", name)
    start = progress.bytes_done
    try:
        with open_blob(entry) as src:
            store.ingest(_Tracked(src, progress, notify, cancel),  # type: ignore[arg-type]
                         expected_digest=entry.digest, expected_size=entry.size)
    except StoreError as e:
        progress.bytes_done = start
        raise BundleRejected(f"{name}: {e.message}", code=f"blob_{e.code}") from e
    except OSError as e:
        progress.bytes_done = start
        if e.errno in DISK_FULL_ERRNOS:
            raise ImportFailed(f"the store's disk is full while copying {name}", code="disk_full") from e
        raise ImportFailed(f"reading or writing {name} failed: {e.strerror}", code="io_error") from e
    return True


def copy_all(store: ModelStore, open_blob: BlobOpener, files: tuple[FileEntry, ...], progress: Progress,
             notify: Callable[[], None], checkpoint: Callable[[str], None], added: list[str],
             cancel: threading.Event) -> None:
    """Copy every listed file (policy first: a bad policy fails fast); append new digests to `added`."""
    ordered = sorted(files, key=lambda f: f.kind != "policy")
    for i, entry in enumerate(ordered):
        if cancel.is_set():
            raise ImportFailed("the import was cancelled", code="cancelled")
        if copy_blob(store, open_blob, entry, progress, notify, cancel):
            added.append(entry.digest)
        if entry.kind == "policy":
            with store.blob_path(entry.digest).open("rb") as f:
                parse_policy(f.read(MAX_POLICY_BYTES + 1))
        progress.files_done += 1
        notify()
        checkpoint(f"blob:{i}")
    progress.current_file = None
