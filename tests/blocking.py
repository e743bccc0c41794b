"""The event-loop blocking detector the test suite runs under (blockbuster, as home-assistant's supervisor uses it).

While a test runs, blocking calls (file and socket I/O, os.stat and friends, sqlite, time.sleep, contended
locks, and here also fsync) made on a thread that runs an event loop, from code of the four product packages,
raise `BlockingError`. Code in executor threads and worker processes is not affected. Because product code may
catch the error (a broad `except` that logs, the error middleware that answers 500), every detection is also
recorded and the test fails at teardown with the sites listed, whether or not the error surfaced.

`ALLOWED` is the explicit list of known product-code sites still to be fixed (issue 7 item 22): one entry per
function, never per module, so a new blocking call anywhere else still fails. Remove an entry with its fix.
"""

from __future__ import annotations

import inspect
import os
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import blockbuster.blockbuster as bbmod
from blockbuster import BlockBuster, BlockBusterFunction

SCANNED = ["daemon", "runtime", "sync", "hardware"]
ROOT = Path(__file__).resolve().parent.parent
PRODUCT_DIRS = tuple(str(ROOT / m) + os.sep for m in SCANNED)
TESTS_DIR = str(ROOT / "tests") + os.sep
ASYNC_CODE = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE

# Blocking calls blockbuster does not wrap by default but that stall an appliance's loop on slow flash.
EXTRA = ("fsync", "fdatasync")

# Library code that may block wherever it is called from: the logging module writes each record to its
# handlers synchronously (stderr, journald's pipe in production); that is how logging works, not an atoll bug.
LIBRARY = [("logging/__init__.py", {"emit", "flush"})]

# Known sites that block a running loop, each the innermost function of ours (file relative to the repo, function
# name) that makes the call: a blocking call made directly in that function is tolerated, the same call anywhere
# else still fails. Product-code entries are issue 7 item 22's to-do list: fix the function, remove its entry.
ALLOWED: dict[tuple[str, str], str] = {
    # -- product code, to fix (found by `ATOLL_BLOCKING_SURVEY=/tmp/s pytest -m "not slow"`) --------------------
    # runtime: the model store's directory set-up and fsync, on the loop during an import
    ("runtime/store.py", "ensure"): "mkdir of blobs/ and staging/ (from ImportManager._locked)",
    ("runtime/store.py", "fsync_dir"): "directory fsync (from atomic_write, _apply)",
    # runtime/hardware: re-reading a variant's GGUF header on the loop (governor callback -> _still_good, reload)
    ("runtime/store.py", "inspect"): "stat of the blob, then read_gguf (from HardwareControl._still_good)",
    ("hardware/gguf.py", "read_gguf"): "stat and open of the GGUF file",
    ("hardware/gguf.py", "read"): "_Reader.read: the header's many small reads",
    # runtime: asyncio's own subprocess spawn forks and reads the exec-status pipe on the loop
    ("runtime/worker_client.py", "start"): "asyncio.create_subprocess_exec: fork/exec handshake (os.read, lock)",
    # sync: the import/apply path run on the loop (daemon upload/path import, `atoll import`, USB watcher)
    ("sync/apply.py", "_apply"): "state-file stat/unlink and reads of the staged release",
    ("sync/apply.py", "import_tar"): "shutil.disk_usage (statvfs) before unpacking",
    ("sync/fsutil.py", "atomic_write"): "write + fsync + rename of sync-state.json and release files",
    ("sync/state.py", "load"): "reads sync-state.json",
    ("sync/state.py", "read_release"): "reads releases/N/manifest.json",
    ("sync/state.py", "release_by_sequence"): "stat of releases/N/manifest.json (rollback)",
    ("sync/state.py", "read_current_release"): "readlink/stat of current (admin status, /admin/bundles)",
    ("sync/state.py", "current_target"): "stat of current (the daemon's watch on current)",
    # sync: the USB watcher
    ("sync/watch.py", "start"): "is_dir of each media dir, watchdog schedule (scandir)",
    ("sync/watch.py", "stop"): "watchdog Observer.stop (inotify write, lock)",
    ("sync/watch.py", "_fire"): "is_file of the stick's bundle.json in the debounce callback",
    ("sync/policy.py", "load_policy"): "reads the release's policy file (from updates.reload)",
    ("runtime/store.py", "_read_catalog"): "reads catalog.json (from ModelStore.families in the health check)",
    # daemon
    ("daemon/api_updates.py", "post_bundle"): "writes the uploaded tar body to disk in the handler",
    ("daemon/db.py", "stop"): "ThreadPoolExecutor.shutdown(wait=True) joins the DB thread on the loop",
    ("daemon/api_admin.py", "admin_status"): "psutil.Process(...) reads /proc in the handler",
    # -- test code: deliberate, the fault is injected synchronously at that exact point of the copy ---------------
    ("tests/sync/test_crash.py", "fill"): "fills the tmpfs from the progress callback",
    ("tests/sync/test_crash.py", "pull"): "removes the stick's files from the progress callback",
    ("tests/sync/test_crash.py", "cut"): "truncates a blob on the stick from the progress callback",
}


def _our_frames_now() -> list[tuple[str, str, bool]]:
    """(file relative to the repo, function, is async) of our own frames on the stack, innermost first."""
    out = []
    frame = inspect.currentframe()
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith((*PRODUCT_DIRS, TESTS_DIR)) and not name.endswith(os.sep + "blocking.py"):
            out.append((name[len(str(ROOT)) + 1:], frame.f_code.co_name, bool(frame.f_code.co_flags & ASYNC_CODE)))
        frame = frame.f_back
    return out


def driven_by_a_test(ours: list[tuple[str, str, bool]]) -> bool:
    """True when the blocking call is a test (or fixture) calling a synchronous product helper itself.

    That blocks only the test's own loop, the way a test's own `open()` does, and is not what the detector is
    for: a product coroutine or a product callback run by the loop (where the daemon would block) is.
    """
    if not ours or any(not f.startswith("tests/") and is_async for f, _, is_async in ours):
        return False
    return ours[-1][0].startswith("tests/")  # the frame nearest the loop is a test's


class Detections:
    """The blocking calls seen during one test, each as a short stack of our own frames."""

    def __init__(self) -> None:
        self.sites: list[str] = []

    def record(self, func: str) -> None:
        """Remember where `func` was called from (product frames, plus the test frame that led there)."""
        frames = [f for f in traceback.extract_stack()[:-2]
                  if f.filename.startswith(str(ROOT)) and "/.venv/" not in f.filename]
        shown = [f"{Path(f.filename).relative_to(ROOT)}:{f.lineno} {f.name}" for f in reversed(frames)]
        self.sites.append(f"{func} at " + " <- ".join(shown[:6]))


def _tolerated_in_stack(fn: BlockBusterFunction) -> bool:
    """blockbuster's own per-function exceptions, which it checks only after the predicate."""
    frame = inspect.currentframe()
    while frame is not None:
        for file, functions in fn.can_block_functions:
            if frame.f_code.co_filename.endswith(file) and frame.f_code.co_name in functions:
                return True
        frame = frame.f_back
    return False


def _predicate(fn: BlockBusterFunction, surveyed: set[tuple[Any, ...]]) -> Callable[..., bool]:
    """blockbuster's own predicate, or a test-driven call, or an ALLOWED site; in survey mode, record the rest."""
    survey = os.environ.get("ATOLL_BLOCKING_SURVEY")
    predicate, name = fn.can_block_predicate, fn.full_name

    def can_block(*args: Any, **kwargs: Any) -> bool:
        if predicate(*args, **kwargs):
            return True
        ours = _our_frames_now()
        if driven_by_a_test(ours) or (ours and ours[0][:2] in ALLOWED):
            return True
        if survey and not _tolerated_in_stack(fn) and any(not f.startswith("tests/") for f, _, _ in ours):
            # list every site (once per test) instead of failing at the first one
            key = (name, ours[0][:2])
            if key not in surveyed:
                surveyed.add(key)
                with open(survey, "a") as f:
                    f.write(f"{name}\t" + " <- ".join(f"{f} {fn_}" for f, fn_, _ in ours[:8]) + "\n")
            return True
        return False

    return can_block


@contextmanager
def detector() -> Iterator[Detections]:
    """Activate blockbuster over the product packages; yield the record of what it caught."""
    seen = Detections()
    original = bbmod.BlockingError

    class RecordedBlockingError(original):  # type: ignore[valid-type, misc]
        def __init__(self, func: str) -> None:
            seen.record(func)
            super().__init__(func)

    bb = BlockBuster(SCANNED)
    for name in EXTRA:
        bb.functions[f"os.{name}"] = BlockBusterFunction(os, name, scanned_modules=SCANNED)
    surveyed: set[tuple[Any, ...]] = set()
    for fn in bb.functions.values():
        for file, functions in LIBRARY:
            fn.can_block_in(file, functions)
        fn.can_block_predicate = _predicate(fn, surveyed)
    bbmod.BlockingError = RecordedBlockingError  # type: ignore[misc]
    bb.activate()
    try:
        yield seen
    finally:
        bb.deactivate()
        bbmod.BlockingError = original  # type: ignore[misc]
