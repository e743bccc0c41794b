"""Import a bundle: verify, copy, build the release, health-check, switch, commit, clean.

Crash safety: before the first write a `pending` marker is committed to
sync-state.json; the commit of the new sequence clears it in the same atomic write.
`SyncManager.recover()` (call it at start-up, before serving) finds a marker left by a
crash, points `current` back at the committed release, removes the half-built one and
every blob no kept release references. So the box is always on the old release or on
the new one, never a mix.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

from runtime.errors import AtollError
from runtime.store import ModelStore
from sync.copy import BlobOpener, Progress, ProgressCallback, copy_all, dir_blobs
from sync.errors import (
    AlreadyInstalled,
    BundleRejected,
    ImportFailed,
    ImportInProgress,
    RollbackUnavailable,
)
from sync.fsutil import atomic_write, format_time, fsync_dir
from sync.health import DEFAULT_HEALTH_CHECKS, HealthCheck
from sync.recovery import clean_staging, collect_garbage, undo_import
from sync.state import (
    STATE_FILE,
    Release,
    SyncState,
    current_target,
    read_current_release,
    release_by_sequence,
    switch_current,
    write_release,
)
from sync.tarball import read_bundle_tar
from sync.verify import SyncConfig, VerifiedBundle, verify_bundle

log = logging.getLogger(__name__)

Audit = Callable[[str, dict[str, Any]], None]
Checkpoint = Callable[[str], None]


@dataclass(frozen=True)
class ImportResult:
    """How an import ended when it did not raise."""

    status: str  # "installed" | "already_installed"
    sequence: int
    version: str
    files_copied: int
    bytes_copied: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form for the admin API and the audit log."""
        return asdict(self)


def _no_audit(event: str, details: dict[str, Any]) -> None:
    log.info("audit %s %s", event, details)


def _no_checkpoint(step: str) -> None:
    return None


class SyncManager:
    """The box side of sync: import, rollback, start-up recovery, the current release.

    One instance per daemon. `audit(event, details)` is called on the event-loop thread
    (by `recover()`, on the caller's). `on_progress(progress)` is called on the loop thread
    and, while blobs are copied, on the copy thread: hand it on with
    `loop.call_soon_threadsafe`, or just poll `manager.progress.snapshot()`. Imports and
    rollbacks are serialized in-process and across processes (flock on .sync.lock); a
    second one gets ImportInProgress (409).
    """

    def __init__(self, state_dir: str | os.PathLike[str], config: SyncConfig | None = None, *,
                 health_checks: Sequence[HealthCheck] = DEFAULT_HEALTH_CHECKS,
                 audit: Audit | None = None, on_progress: ProgressCallback | None = None,
                 checkpoint: Checkpoint | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.store = ModelStore(self.state_dir)
        self.config = config or SyncConfig()
        self.health_checks = tuple(health_checks)
        self.audit = audit or _no_audit
        self.on_progress = on_progress
        self.checkpoint = checkpoint or _no_checkpoint
        self.progress = Progress()
        self._lock = asyncio.Lock()
        self._undo_file = self.state_dir / f".{STATE_FILE}.undo"
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sync-copy")

    # -- reading -------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether an import or rollback is running in this process."""
        return self._lock.locked()

    def current_release(self) -> Release | None:
        """The release `current` points to (None before the first import)."""
        return read_current_release(self.state_dir)

    def state(self) -> SyncState:
        """The committed sync state."""
        return SyncState.load(self.state_dir)

    def _notify(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress)

    def _phase(self, phase: str) -> None:
        self.progress.phase = phase
        self._notify()

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """Exclusive import/rollback (a second one gets 409), then the store lock (waited for:
        an `atoll models add` in another process finishes first)."""
        if self._lock.locked():
            raise ImportInProgress("an import or rollback is already running")
        async with self._lock:
            await asyncio.to_thread(self.store.ensure)
            with (self.state_dir / ".sync.lock").open("a") as lk:
                try:
                    fcntl.flock(lk, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as e:
                    raise ImportInProgress("another process holds the sync lock") from e
                async with self.store.lock_async():
                    yield

    # -- start-up ------------------------------------------------------------------------

    def recover(self) -> str | None:
        """Undo an interrupted import, re-align `current`, collect garbage; return what was done."""
        if not self.state_dir.is_dir():
            return None
        with (self.state_dir / ".sync.lock").open("a") as lk:
            try:
                fcntl.flock(lk, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise ImportInProgress("an import is running; recover only at start-up") from e
            with self.store.lock():
                return self._recover()

    def _recover(self) -> str | None:
        st = SyncState.load(self.state_dir)
        what = None
        if st.pending is not None:
            seq = int(st.pending["sequence"])
            undo_import(self.state_dir, seq, st, added=None)
            collect_garbage(self.state_dir, st, at_startup=True)  # frees space before the state write
            what = f"import of sequence {seq} was interrupted; returned to release {st.current}"
            st.pending = None
            st.save(self.state_dir)
            self._undo_file.unlink(missing_ok=True)
            self.audit("sync.recovered", {"interrupted_sequence": seq, "current": st.current})
            log.warning("%s", what)
        elif self.state_dir.is_dir() and current_target(self.state_dir) != st.current:
            switch_current(self.state_dir, st.current)
            what = f"current re-pointed to committed release {st.current}"
            self.audit("sync.recovered", {"current": st.current})
        if st.current is not None or what:
            collect_garbage(self.state_dir, st, at_startup=True)
        else:  # no release yet: nothing to collect, but a killed upload or import may have left staging
            clean_staging(self.state_dir, all_entries=True)
        self._undo_file.unlink(missing_ok=True)
        return what

    # -- import --------------------------------------------------------------------------

    async def import_tar(self, tar_path: str | os.PathLike[str]) -> ImportResult:
        """Import a bundle packed as a tar file: headers checked and metadata read first, blobs
        streamed from the tar into the store only after the signatures verified (sync.tarball)."""
        try:
            await asyncio.to_thread(self.store.ensure)
            bundle = await asyncio.to_thread(read_bundle_tar, Path(tar_path), self.store.staging_dir)
        except BaseException as e:
            if self.busy:  # another import's progress is shown: record this refusal in the audit log only
                self.audit("sync.import.rejected", {"path": str(tar_path), "code": getattr(e, "code", "bad_tar"),
                                                    "message": getattr(e, "message", "unreadable tar")})
                raise
            self.progress = Progress(phase="reading")
            self._fail(e, tar_path)
        try:
            return await self.import_bundle(bundle.work, open_blob=bundle.open_blob)
        finally:
            await asyncio.to_thread(bundle.remove)

    async def import_bundle(self, path: str | os.PathLike[str], *,
                            open_blob: BlobOpener | None = None) -> ImportResult:
        """Verify and apply the bundle at `path` (stick mount, ATOLL/ dir or bundle.json).

        `open_blob` reads the listed blobs from elsewhere (a tar); by default from ATOLL/blobs.
        Whatever goes wrong ends as a recorded, audited failure: progress phase "failed" with
        the error, and an ImportFailed (with no internal text) for an unexpected exception.
        """
        async with self._locked():
            try:
                return await self._import(Path(path), open_blob)
            except BaseException as e:
                self._fail(e, path)

    def _fail(self, e: BaseException, path: str | os.PathLike[str]) -> NoReturn:
        """Record an import's end by `e` (unless the step that raised did), then raise it (an
        unexpected exception as ImportFailed, its text in the log only). Call from an except block."""
        out: BaseException = e
        if isinstance(e, Exception) and not isinstance(e, AtollError):
            log.error("import of %s failed with an unexpected error", path, exc_info=e)
            out = ImportFailed(f"import of {path} failed with an internal error; the daemon log has the details")
        if self.progress.phase not in ("failed", "done"):
            self._record_failure(out, path)
        if out is e:
            raise
        raise out from e

    def _record_failure(self, out: BaseException, path: str | os.PathLike[str]) -> None:
        message = getattr(out, "message", None) or "the import was cancelled"
        code = getattr(out, "code", "cancelled")
        self.progress.error = message
        self._phase("failed")
        event = "sync.import.rejected" if isinstance(out, BundleRejected) else "sync.import.failed"
        self.audit(event, {"path": str(path), "sequence": self.progress.sequence, "code": code,
                           "message": message})

    async def _import(self, path: Path, open_blob: BlobOpener | None) -> ImportResult:
        self.progress = Progress(phase="verifying")
        self._notify()
        if (await asyncio.to_thread(SyncState.load, self.state_dir)).pending is not None:
            await asyncio.to_thread(self._recover)
        self.audit("sync.import.started", {"path": str(path)})
        t0 = time.monotonic()
        st = await asyncio.to_thread(SyncState.load, self.state_dir)
        try:
            vb = await asyncio.to_thread(verify_bundle, path, self.state_dir, self.config, state=st)
        except AlreadyInstalled as e:
            self._phase("done")
            self.audit("sync.import.noop", {"path": str(path), "reason": e.message})
            return ImportResult("already_installed", st.highest_sequence, "", 0, 0, 0.0)
        m = vb.manifest
        self.progress.sequence = m.sequence
        self.progress.files_total, self.progress.bytes_total = len(m.files), m.total_size
        self.audit("sync.import.verified", {"sequence": m.sequence, "version": m.version,
                                            "bundle_digest": m.digest, "root_version": vb.root.version})
        self.checkpoint("verified")
        result = await self._apply(vb, st, t0, open_blob or dir_blobs(vb.atoll_dir))
        self.audit("sync.import.installed", result.to_json())
        return result

    async def _apply(self, vb: VerifiedBundle, st: SyncState, t0: float, open_blob: BlobOpener) -> ImportResult:
        m = vb.manifest
        state_file = self.state_dir / STATE_FILE
        state_existed = state_file.exists()
        if state_existed:  # the undo copy lets a failure restore the state without needing free space
            atomic_write(self._undo_file, state_file.read_bytes())
        pending = replace(st, pending={"sequence": m.sequence, "started": format_time(time.time())})
        pending.save(self.state_dir)
        self.checkpoint("pending")
        added: list[str] = []
        cancel = threading.Event()
        copying: concurrent.futures.Future[None] | None = None
        try:
            self._phase("copying")
            # a plain executor future, so a cancelled import can wait for the copy thread to stop
            copying = self._executor.submit(copy_all, self.store, open_blob, m.files, self.progress,
                                            self._notify, self.checkpoint, added, cancel)
            await asyncio.wrap_future(copying)
            self._phase("building")
            release = await asyncio.to_thread(self._build_release, vb)
            self.checkpoint("release_built")
            self._phase("health_check")
            await self._health_check(release)
            self.checkpoint("health_checked")
            self._phase("switching")
            await asyncio.to_thread(switch_current, self.state_dir, m.sequence)
            self.checkpoint("switched")
            if vb.rotated:
                await asyncio.to_thread(atomic_write, self.state_dir / "trust" / "root.json", vb.root.raw)
                self.checkpoint("root_written")
                self.audit("sync.trust_root.rotated", {"root_version": vb.root.version, "sequence": m.sequence})
            self._phase("committing")
            committed = replace(st, current=m.sequence, previous=st.current, highest_sequence=m.sequence,
                                highest_digest=m.digest, newest_created=vb.time_floor,
                                pending=None)
            await asyncio.to_thread(committed.save, self.state_dir)
            self._undo_file.unlink(missing_ok=True)
            self.checkpoint("committed")
        except BaseException as e:
            cancel.set()
            undo = asyncio.ensure_future(asyncio.to_thread(self._undo, copying, m.sequence, st, added,
                                                           state_existed))
            while not undo.done():  # the undo finishes even if we are cancelled again meanwhile
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(undo)
            if undo.exception() is not None:
                log.error("could not undo the import of %d; start-up recovery will: %r",
                          m.sequence, undo.exception())
            self._fail(e, vb.atoll_dir)
        self._phase("cleaning")
        await asyncio.to_thread(collect_garbage, self.state_dir, committed)
        self.checkpoint("cleaned")
        self._phase("done")
        copied = sum(f.size for f in m.files if f.digest in added)
        return ImportResult("installed", m.sequence, m.version, len(added), copied, time.monotonic() - t0)

    def _undo(self, copying: concurrent.futures.Future[None] | None, sequence: int, st: SyncState,
              added: list[str], state_existed: bool) -> None:
        if copying is not None:
            concurrent.futures.wait([copying])  # the copy thread has seen `cancel` and stopped
        undo_import(self.state_dir, sequence, st, added=added)
        if state_existed:
            os.replace(self._undo_file, self.state_dir / STATE_FILE)
            fsync_dir(self.state_dir)
        else:
            (self.state_dir / STATE_FILE).unlink(missing_ok=True)

    def _build_release(self, vb: VerifiedBundle) -> Release:
        m = vb.manifest
        doc = {"format": 1, "sequence": m.sequence, "version": m.version, "bundle_digest": m.digest,
               "created": format_time(m.created), "expires": format_time(m.expires),
               "installed_at": format_time(time.time()), "root_version": vb.root.version,
               "families": m.models, "policy": m.policy,
               "files": [asdict(f) for f in m.files]}
        path = write_release(self.state_dir, doc, m.raw, vb.sigs_raw)
        rel = release_by_sequence(self.state_dir, m.sequence)
        assert rel is not None and rel.path == path
        return rel

    async def _health_check(self, release: Release) -> None:
        try:
            async with asyncio.timeout(self.config.health_timeout):
                for check in self.health_checks:
                    await check(release, self.store)
        except TimeoutError as e:
            raise ImportFailed(f"health check of release {release.sequence} did not finish within "
                               f"{self.config.health_timeout:g} s", code="health_check_timeout") from e
        except (BundleRejected, ImportFailed):
            raise
        except AtollError as e:
            raise ImportFailed(f"health check of release {release.sequence} failed: {e.message}",
                               code="health_check_failed") from e
        except Exception as e:
            log.error("health check of release %d raised", release.sequence, exc_info=e)
            raise ImportFailed(f"health check of release {release.sequence} failed with an internal error; "
                               "the log has the details", code="health_check_failed") from e

    # -- rollback ------------------------------------------------------------------------

    async def rollback(self) -> Release:
        """Return to the previous release (swapping current and previous); return the release now current."""
        async with self._locked():
            st = SyncState.load(self.state_dir)
            prev = release_by_sequence(self.state_dir, st.previous)
            if prev is None:
                raise RollbackUnavailable("there is no previous release to roll back to")
            await asyncio.to_thread(switch_current, self.state_dir, prev.sequence)
            swapped = replace(st, current=prev.sequence, previous=st.current)
            await asyncio.to_thread(swapped.save, self.state_dir)
            self.audit("sync.rollback", {"from": st.current, "to": prev.sequence})
            log.warning("rolled back from release %s to %s", st.current, prev.sequence)
            return prev

