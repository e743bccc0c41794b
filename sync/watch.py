"""Watch removable-media directories and start an import when a bundle appears.

watchdog's observer thread only hands paths to the event loop
(`loop.call_soon_threadsafe`); everything else runs on the loop. A mount point
appears as a new directory before the stick's files are visible, and files already on
a freshly mounted filesystem produce no events, so a new directory is scanned a few
times over the following seconds (`settle_delays`) for `ATOLL/bundle.json`, up to
`max_depth` levels down (/run/media/<user>/<label>/ATOLL). Events under one bundle are
debounced so a bundle being copied in by hand is imported once, after it settles.
The stick is only ever read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger(__name__)

DEFAULT_MEDIA_DIRS = (Path("/media"), Path("/run/media"))
OnBundle = Callable[[Path], Awaitable[Any]]


class _Handler(FileSystemEventHandler):
    """Runs in watchdog's thread: pass interesting paths to the loop, nothing more."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sink: Callable[[Path, bool], None]) -> None:
        self.loop, self.sink = loop, sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        """Hand created/moved/written paths to the loop."""
        # not "modified": reading a bundle can bump atime (IN_ATTRIB), which must not re-trigger
        if event.event_type not in ("created", "moved", "closed"):
            return
        raw = getattr(event, "dest_path", "") or event.src_path
        path = Path(os.fsdecode(raw))
        with contextlib.suppress(RuntimeError):  # loop already closed during shutdown
            self.loop.call_soon_threadsafe(self.sink, path, bool(event.is_directory))


def find_bundles(root: Path, max_depth: int) -> list[Path]:
    """Directories under root (root included, symlinks not followed) that hold ATOLL/bundle.json."""
    found: list[Path] = []
    level = [root]
    for _ in range(max_depth + 1):
        nxt: list[Path] = []
        for d in level:
            if (d / "ATOLL" / "bundle.json").is_file() and not (d / "ATOLL").is_symlink():
                found.append(d)
                continue
            with contextlib.suppress(OSError):
                nxt += [Path(e.path) for e in os.scandir(d)
                        if e.is_dir(follow_symlinks=False) and e.name != "ATOLL"]
        level = nxt
    return found


class UsbWatcher:
    """Calls `on_bundle(stick_dir)` on the event loop when a bundle shows up under a media dir."""

    def __init__(self, on_bundle: OnBundle, media_dirs: Sequence[Path] = DEFAULT_MEDIA_DIRS, *,
                 settle_delays: Sequence[float] = (0.5, 2.0, 5.0), debounce: float = 2.0,
                 max_depth: int = 3, scan_on_start: bool = True) -> None:
        self.on_bundle = on_bundle
        self.media_dirs = tuple(Path(d) for d in media_dirs)
        self.settle_delays, self.debounce = tuple(settle_delays), debounce
        self.max_depth, self.scan_on_start = max_depth, scan_on_start
        self._observer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers: dict[Path, asyncio.TimerHandle] = {}
        self._running: set[Path] = set()

    @property
    def busy(self) -> bool:
        """True while a scan, a debounce timer or an import is pending."""
        return bool(self._tasks or self._timers)

    async def start(self) -> None:
        """Start observing the media directories that exist (others are logged and skipped)."""
        self._loop = asyncio.get_running_loop()
        observer = Observer()
        handler = _Handler(self._loop, self._on_path)
        watched = []
        for d in self.media_dirs:
            if d.is_dir():
                observer.schedule(handler, str(d), recursive=True)
                watched.append(d)
            else:
                log.info("media dir %s does not exist; not watching it", d)
        observer.start()
        self._observer = observer
        log.info("watching %s for update bundles", [str(d) for d in watched])
        if self.scan_on_start:
            for d in watched:
                self._spawn(self._scan(d, (0.0,)))

    async def stop(self) -> None:
        """Stop observing; cancel pending scans (an import already running is awaited)."""
        if self._observer is not None:
            self._observer.stop()
            await asyncio.to_thread(self._observer.join)
            self._observer = None
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        scans = [t for t in self._tasks if t.get_name() == "scan"]
        for t in scans:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any], name: str = "scan") -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_path(self, path: Path, is_dir: bool) -> None:
        parts = path.parts
        if "ATOLL" in parts:
            self._bundle_seen(Path(*parts[: parts.index("ATOLL")]))
        elif is_dir:
            self._spawn(self._scan(path, self.settle_delays))

    async def _scan(self, path: Path, delays: Sequence[float]) -> None:
        for delay in delays:
            await asyncio.sleep(delay)
            found = await asyncio.to_thread(find_bundles, path, self.max_depth)
            for stick in found:
                self._bundle_seen(stick)
            if found:
                return

    def _bundle_seen(self, stick: Path) -> None:
        assert self._loop is not None
        if t := self._timers.pop(stick, None):
            t.cancel()
        self._timers[stick] = self._loop.call_later(self.debounce, self._fire, stick)

    def _fire(self, stick: Path) -> None:
        self._timers.pop(stick, None)
        if stick in self._running or not (stick / "ATOLL" / "bundle.json").is_file():
            return
        self._running.add(stick)
        self._spawn(self._run(stick), name="import")

    async def _run(self, stick: Path) -> None:
        log.info("bundle found at %s", stick)
        try:
            await self.on_bundle(stick)
        except Exception:
            log.exception("import from %s failed", stick)
        finally:
            self._running.discard(stick)
