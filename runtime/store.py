"""The content-addressed model store and its catalog of model families.

Layout under the state dir:

    blobs/sha256-<hex>   model files, named by the SHA-256 of their content
    staging/             partial copies; same filesystem as blobs/ so a rename is atomic
    catalog.json         families -> variants (digests), written atomically
    .store.lock          the store lock (see `ModelStore.lock`)

The store lock is one `flock` on `.store.lock`, so it holds across processes (the
`atoll` CLI and the daemon both change the store). Everything that adds or removes a
blob, writes the catalog or cleans staging holds it: `add_file` from the first byte
copied to the catalog write, an import from its first blob to its garbage collection,
rollback, start-up recovery. Readers need no lock (every write is a rename).

A blob's name is always a validated digest computed here while copying, never a path
that came from outside. A family is a model the API serves under one name (e.g.
"smollm2"); its variants are quantizations or context sizes of that model. The catalog
stores only digests and provenance; what the GGUF header says is read from the blob at
inspection, so a corrupt or truncated blob is reported as broken with its reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import mmap
import os
import re
import tempfile
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from hardware.gguf import GGUFError, GGUFInfo, read_gguf
from runtime.errors import BadRequest

log = logging.getLogger(__name__)

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
FAMILY_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
COPY_CHUNK = 1 << 20
TASKS = ("generate", "embed")


class StoreError(BadRequest):
    """A file could not be placed in the store; the message says why."""


def validate_digest(digest: str) -> str:
    """Return `digest` (64 lower-case hex chars, optional 'sha256-'/'sha256:' prefix stripped) or raise."""
    d = digest.removeprefix("sha256-").removeprefix("sha256:")
    if not DIGEST_RE.fullmatch(d):
        raise StoreError(f"not a sha256 digest: {digest!r}")
    return d


def validate_family(name: str) -> str:
    """Return `name` if it is a usable family name (lower-case letters, digits, . _ -)."""
    if not FAMILY_RE.fullmatch(name):
        raise StoreError(f"bad family name {name!r}: use 1-64 lower-case letters, digits, '.', '_' or '-'")
    return name


def fsync_dir(path: Path) -> None:
    """fsync a directory so renames inside it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Variant:
    """One file of a family as the catalog lists it, plus what inspection found."""

    family: str
    digest: str
    size: int
    source_name: str
    added: str
    task: str = "generate"
    info: GGUFInfo | None = field(default=None, repr=False)
    broken: str | None = None

    @property
    def quantization(self) -> str:
        """Quantization type from the header, 'unknown' if unreadable."""
        return self.info.quantization if self.info else "unknown"

    def to_json(self) -> dict[str, Any]:
        """The variant as shown by `atoll models list --json` and the admin API."""
        return {
            "family": self.family, "digest": self.digest, "size": self.size,
            "source_name": self.source_name, "added": self.added, "task": self.task,
            "broken": self.broken, "gguf": self.info.summary() if self.info else None,
        }


class ModelStore:
    """Blobs by digest plus the family catalog, rooted at a state directory."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.root = Path(state_dir)
        self.blobs_dir = self.root / "blobs"
        self.staging_dir = self.root / "staging"
        self.catalog_path = self.root / "catalog.json"

    def ensure(self) -> None:
        """Create the store's directories if missing."""
        for d in (self.root, self.blobs_dir, self.staging_dir):
            d.mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: str) -> Path:
        """Path of the blob with this digest (validated; never a path from outside)."""
        return self.blobs_dir / f"sha256-{validate_digest(digest)}"

    def has_blob(self, digest: str) -> bool:
        """Whether a blob with this digest is present."""
        return self.blob_path(digest).is_file()

    # -- placing blobs -------------------------------------------------------------------

    def ingest(self, src: BinaryIO, *, expected_digest: str | None = None,
               expected_size: int | None = None) -> tuple[str, int]:
        """Copy `src` into the store while hashing it; return (digest, size).

        Reads at most expected_size + 1 bytes when a size is given, so a longer source is
        refused without reading it all. The copy is fsynced in staging, renamed into
        blobs/ and the directory fsynced; on any failure the partial copy is removed and
        the store is unchanged.
        """
        self.ensure()
        want = validate_digest(expected_digest) if expected_digest else None
        h = hashlib.sha256()
        cap = None if expected_size is None else expected_size + 1
        fd, tmp_name = tempfile.mkstemp(prefix="ingest-", dir=self.staging_dir)
        tmp = Path(tmp_name)
        try:
            try:
                size = _copy_hashing(src, fd, h, cap)
                os.fsync(fd)
            finally:
                os.close(fd)
            digest = h.hexdigest()
            if expected_size is not None and size != expected_size:
                raise StoreError(f"size mismatch: expected {expected_size} bytes, got "
                                 f"{'more' if size > expected_size else size}", code="size_mismatch")
            if want is not None and digest != want:
                raise StoreError(f"hash mismatch: expected sha256 {want}, got {digest}", code="hash_mismatch")
            final = self.blob_path(digest)
            os.replace(tmp, final)
            fsync_dir(self.blobs_dir)
            return digest, size
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    # -- the catalog ---------------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        """The file whose flock is the store lock."""
        return self.root / ".store.lock"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store lock (blocking; not re-entrant: never nest it)."""
        self.ensure()
        with self.lock_path.open("a") as lk:
            try:
                fcntl.flock(lk, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for the store lock (another add, import or clean-up is running)")
                fcntl.flock(lk, fcntl.LOCK_EX)
            yield

    @contextlib.asynccontextmanager
    async def lock_async(self, poll: float = 0.05) -> AsyncIterator[None]:
        """Hold the store lock from async code: polled, so it never blocks the loop and can be cancelled."""
        await asyncio.to_thread(self.ensure)
        with self.lock_path.open("a") as lk:
            logged = False
            while True:
                try:
                    fcntl.flock(lk, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not logged:
                        log.info("waiting for the store lock (another add, import or clean-up is running)")
                        logged = True
                    await asyncio.sleep(poll)
            yield

    def read_catalog(self) -> dict[str, Any]:
        """The parsed catalog ({"families": {}} when absent); StoreError if it cannot be read."""
        return self._read_catalog()

    def _read_catalog(self) -> dict[str, Any]:
        try:
            data = json.loads(self.catalog_path.read_text())
        except FileNotFoundError:
            return {"families": {}}
        except (OSError, ValueError) as e:
            raise StoreError(f"catalog {self.catalog_path} is unreadable: {e}") from e
        if not isinstance(data, dict) or not isinstance(data.get("families"), dict):
            raise StoreError(f"catalog {self.catalog_path} has no 'families' object")
        return data

    def _write_catalog(self, data: dict[str, Any]) -> None:
        tmp = self.catalog_path.with_suffix(".tmp")
        with tmp.open("w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.catalog_path)
        fsync_dir(self.root)

    def add_file(self, path: str | os.PathLike[str], family: str | None = None,
                 task: str | None = None) -> Variant:
        """Copy a local GGUF file into the store and list it as a variant of `family`.

        The file must parse as GGUF; the family defaults to the header's basename.
        Adding a file already present is a no-op that returns the existing variant.
        """
        p = Path(path)
        try:
            info = read_gguf(p)
        except GGUFError as e:
            raise StoreError(f"{p}: {e}") from e
        fam = validate_family(family or _default_family(info, p))
        if task is None:
            task = "embed" if info.is_embedding_model else "generate"
        if task not in TASKS:
            raise StoreError(f"unknown task {task!r}: one of {', '.join(TASKS)}")
        # one hold of the store lock from the copy to the catalog write: garbage collection
        # cannot see the new blob before the catalog lists it
        with self.lock():
            self._check_family(self._read_catalog(), fam, task)  # refuse before copying anything
            with p.open("rb") as f:
                digest, size = self.ingest(f)
            cat = self._read_catalog()
            self._check_family(cat, fam, task)
            entry = cat["families"].setdefault(fam, {"task": task, "variants": []})
            for v in entry["variants"]:
                if v["digest"] == digest:
                    return self._variant(fam, entry, v)
            v = {"digest": digest, "size": size, "source_name": p.name,
                 "added": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
            entry["variants"].append(v)
            self._write_catalog(cat)
        log.info("added %s to family %s as sha256-%s (%d bytes)", p.name, fam, digest, size)
        return self._variant(fam, entry, v, info)

    @staticmethod
    def _check_family(cat: dict[str, Any], fam: str, task: str) -> None:
        entry = cat["families"].get(fam)
        if entry is not None and entry.get("task", "generate") != task:
            raise StoreError(f"family {fam!r} serves task {entry['task']!r}, not {task!r}")

    def _variant(self, fam: str, entry: dict[str, Any], v: dict[str, Any],
                 info: GGUFInfo | None = None) -> Variant:
        return Variant(family=fam, digest=v["digest"], size=int(v["size"]),
                       source_name=str(v.get("source_name", "")), added=str(v.get("added", "")),
                       task=str(entry.get("task", "generate")), info=info)

    def families(self, release: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, list[Variant]]:
        """Every family and its variants, each inspected: header read, size checked, or marked broken.

        `release` is the installed signed release's families (sync.state.Release.families);
        a family it names replaces the locally added one of the same name.
        """
        cat = self._read_catalog()
        entries: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {
            fam: (entry, entry.get("variants", [])) for fam, entry in cat["families"].items()}
        for fam, variants in (release or {}).items():
            task = next((str(v["task"]) for v in variants if v.get("task")), "generate")
            entries[fam] = ({"task": task}, [{**v, "source_name": v.get("source_name", "signed release")}
                                             for v in variants])
        return {fam: [self.inspect(self._variant(fam, entry, v)) for v in variants]
                for fam, (entry, variants) in sorted(entries.items())}

    def inspect(self, v: Variant) -> Variant:
        """Fill in v.info from the blob's header, or set v.broken with the reason."""
        try:
            path = self.blob_path(v.digest)
            actual = path.stat().st_size
            if actual != v.size:
                raise GGUFError(f"blob is {actual} bytes, catalog says {v.size}")
            v.info = read_gguf(path)
        except FileNotFoundError:
            v.broken = "blob missing from the store"
        except (GGUFError, StoreError) as e:
            v.broken = str(e)
        if v.broken:
            log.warning("model %s variant sha256-%s is broken: %s", v.family, v.digest[:12], v.broken)
        return v


#: Pipelined copy: buffers in flight between the reading/hashing thread and the writer.
PIPE_CHUNK = 4 << 20
PIPE_DEPTH = 4
DIRECT_ALIGN = 4096


class _Writer:
    """Writes chunks to `fd`, with O_DIRECT where the filesystem allows it.

    O_DIRECT skips the page cache (the copy is fsynced anyway), which on the boxes
    measured is several times faster than buffered writes and lets writing overlap
    with hashing. The unaligned tail of the file is written buffered.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, self.flags | os.O_DIRECT)
            self.direct = True
        except OSError:  # tmpfs and some FUSE filesystems
            self.direct = False

    def _buffered(self) -> None:
        if self.direct:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, self.flags)
            self.direct = False

    def _write_all(self, view: memoryview) -> None:
        while view:
            view = view[os.write(self.fd, view):]

    def write(self, buf: mmap.mmap, n: int) -> None:
        view = memoryview(buf)[:n]
        if self.direct:
            start = os.lseek(self.fd, 0, os.SEEK_CUR)
            try:
                self._write_all(view[: n - n % DIRECT_ALIGN])
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._buffered()  # O_DIRECT accepted by fcntl but refused by the filesystem
            view = view[os.lseek(self.fd, 0, os.SEEK_CUR) - start:]
        if view:
            self._buffered()
            self._write_all(view)


def _fill(src: BinaryIO, view: memoryview) -> int:
    """readinto until `view` is full or the source ends (keeps writes aligned)."""
    got = 0
    while got < len(view):
        n = src.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


def _copy_hashing(src: BinaryIO, fd: int, h: Any, cap: int | None) -> int:
    """Copy src to fd, hashing what is read; read at most `cap` bytes. Writing runs in a second thread."""
    writer = _Writer(fd)
    bufs = [mmap.mmap(-1, PIPE_CHUNK) for _ in range(PIPE_DEPTH)]
    inflight: collections.deque[Future[None]] = collections.deque()
    size = 0
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="ingest-write") as ex:
            for i in itertools.count():
                if len(inflight) == PIPE_DEPTH:
                    inflight.popleft().result()  # frees bufs[i % PIPE_DEPTH]
                limit = PIPE_CHUNK if cap is None else min(PIPE_CHUNK, cap - size)
                view = memoryview(bufs[i % PIPE_DEPTH])[:limit]
                n = _fill(src, view) if limit else 0
                if n:
                    h.update(view[:n])
                    size += n
                    inflight.append(ex.submit(writer.write, bufs[i % PIPE_DEPTH], n))
                view.release()
                if n < PIPE_CHUNK:
                    break
            while inflight:
                inflight.popleft().result()
    finally:
        for f in inflight:
            f.cancel()
        for b in bufs:
            with contextlib.suppress(BufferError):  # a traceback may still hold a view; GC frees it
                b.close()
    return size


def _default_family(info: GGUFInfo, path: Path) -> str:
    base = info.get("general.basename") or path.stem.split(".")[0]
    size = info.get("general.size_label")
    name = f"{base}-{size}" if size and str(size).lower() not in str(base).lower() else str(base)
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")[:64] or "model"
