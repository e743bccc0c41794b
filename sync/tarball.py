"""Import from a tar file without letting `tarfile` parse untrusted headers.

A bundle tar is read by a small bounded reader of plain ustar headers (POSIX `ustar\\0`
or GNU `ustar  ` magic): no pax (`x`, `g`) or GNU (`L`, `K`, `S`) extension headers, no
compression, at most MAX_MEMBERS headers, each 512-byte header checksummed. Sizes are
octal or GNU base-256 (so one blob may exceed 8 GiB without an extension header).

Reading is two-phase so nothing is written before the signatures are checked:

1. `read_bundle_tar` walks the headers (seeking over data), checks every name, type and
   size cap (the rules below), copies only the small metadata members (bundle.json, its
   signatures, root/N.root.json) into staging/tar-<random>/ATOLL/, and records where
   each blob's data starts. The caller verifies that directory like a stick.
2. `TarBundle.open_blob` gives the copy a reader of exactly one listed blob's bytes,
   which the store hashes while copying and caps at the listed size. Members the
   manifest does not list are never read.

Names accepted: ATOLL, ATOLL/root, ATOLL/blobs (directories); ATOLL/bundle.json,
ATOLL/bundle.json.sigs, ATOLL/root/<N>.root.json, ATOLL/blobs/sha256-<hex> (regular
files). No links or devices, no absolute paths or `..`, no duplicates.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sync.errors import BundleRejected
from sync.fsutil import open_regular
from sync.manifest import MAX_FILE_SIZE, MAX_MANIFEST_BYTES, FileEntry
from sync.recovery import hold_entry
from sync.roots import MAX_ROOT_BYTES

log = logging.getLogger(__name__)

BLOCK = 512
MAX_MEMBERS = 1024
DIRS = frozenset({"ATOLL", "ATOLL/root", "ATOLL/blobs"})
BLOB_RE = re.compile(r"ATOLL/blobs/sha256-([0-9a-f]{64})")
META_CAPS: tuple[tuple[re.Pattern[str], int], ...] = (
    (re.compile(r"ATOLL/bundle\.json"), MAX_MANIFEST_BYTES),
    (re.compile(r"ATOLL/bundle\.json\.sigs"), 64 * 1024),
    (re.compile(r"ATOLL/root/[1-9][0-9]{0,8}\.root\.json"), MAX_ROOT_BYTES),
)
REGULAR, DIRECTORY = (b"0", b"\0"), b"5"
EXTENSIONS = {b"x": "a pax extended header", b"g": "a pax global header", b"L": "a GNU long-name header",
              b"K": "a GNU long-link header", b"S": "a GNU sparse member", b"N": "a GNU old long-name header"}
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
MAGICS = (b"ustar\x0000", b"ustar  \x00")


def _refuse(msg: str) -> BundleRejected:
    return BundleRejected(f"tar: {msg}", code="bad_tar_member")


def _bad_tar(msg: str) -> BundleRejected:
    return BundleRejected(f"tar: {msg}", code="bad_tar")


def _check_name(name: str) -> str:
    n = name.removeprefix("./").rstrip("/")
    if name.startswith("/") or "\\" in n or any(p in ("", ".", "..") for p in n.split("/")):
        raise _refuse(f"member name {name!r} is absolute or not normalized")
    return n


def _number(field: bytes, what: str) -> int:
    """An octal ustar number, or GNU base-256 (high bit set, positive only)."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if not digits or len(digits) > 12 or not all(48 <= c <= 55 for c in digits):
        raise _bad_tar(f"header field {what} is not an octal number")
    return int(digits, 8)


@dataclass(frozen=True)
class Header:
    """One parsed ustar header: member name, type flag, data size and where the data starts."""

    name: str
    kind: bytes
    size: int
    offset: int


def parse_header(block: bytes, offset: int) -> Header | None:
    """Parse one 512-byte header (None for the end-of-archive zero block); refuse anything but ustar."""
    if block == bytes(BLOCK):
        return None
    if block[257:265] not in MAGICS:
        raise _bad_tar(f"the header at byte {offset} is not a plain ustar header")
    stored = _number(block[148:156], "chksum")
    if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        raise _bad_tar(f"the header at byte {offset} has a bad checksum")
    kind = block[156:157]
    if kind in EXTENSIONS:
        raise _bad_tar(f"the member at byte {offset} is {EXTENSIONS[kind]}; only plain ustar is accepted "
                       "(pack with `tar --format=ustar`)")
    raw_name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\x00" and (prefix := block[345:500].split(b"\0", 1)[0]):
        raw_name = prefix + b"/" + raw_name
    try:
        name = raw_name.decode("ascii")
    except UnicodeDecodeError:
        raise _refuse(f"member name {raw_name[:120]!r} is not ASCII") from None
    size = _number(block[124:136], "size")
    if size > MAX_FILE_SIZE:
        raise _refuse(f"member {name!r} is too large")
    return Header(name, kind, size, offset + BLOCK)


def iter_headers(f: BinaryIO, file_size: int) -> Iterator[Header]:
    """Each member header of the tar open in `f`, seeking over member data; capped at MAX_MEMBERS."""
    offset = 0
    for count in range(MAX_MEMBERS + 1):
        f.seek(offset)
        block = f.read(BLOCK)
        if len(block) < BLOCK:
            if offset == 0:
                raise _bad_tar("the file is not a tar archive")
            raise _bad_tar(f"the archive ends inside a header at byte {offset}")
        if offset == 0:
            for magic, kind in COMPRESSED.items():
                if block.startswith(magic):
                    raise _bad_tar(f"the file is {kind}-compressed; send a plain (uncompressed) ustar tar")
        h = parse_header(block, offset)
        if h is None:
            return
        if count == MAX_MEMBERS:
            raise _refuse(f"more than {MAX_MEMBERS} members")
        if h.offset + h.size > file_size:
            raise _bad_tar(f"member {h.name!r} is truncated")
        yield h
        offset = h.offset + -(-h.size // BLOCK) * BLOCK
    raise _refuse(f"more than {MAX_MEMBERS} members")


class _Slice(io.RawIOBase):
    """Reads `size` bytes of `f` starting at `offset`, then reports end of file."""

    def __init__(self, f: BinaryIO, offset: int, size: int) -> None:
        super().__init__()
        self.f, self.left = f, size
        f.seek(offset)

    def readable(self) -> bool:
        """It is."""
        return True

    def readinto(self, view: memoryview) -> int:  # type: ignore[override]
        """Read up to len(view) bytes of the member."""
        n = self.f.readinto(view[: min(len(view), self.left)]) if self.left else 0  # type: ignore[attr-defined]
        self.left -= n or 0
        return int(n or 0)

    def close(self) -> None:
        """Close the underlying tar file too."""
        self.f.close()
        super().close()


@dataclass
class TarBundle:
    """A bundle tar whose headers passed: its metadata in `work`, its blobs still in the tar."""

    tar_path: Path
    work: Path
    blobs: dict[str, Header] = field(default_factory=dict)
    #: flock held on `work` until remove(): start-up clean-up by another process leaves it alone
    hold: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def open_blob(self, entry: FileEntry) -> BinaryIO:
        """A reader of exactly the listed blob's bytes; BundleRejected if the tar lacks it."""
        h = self.blobs.get(entry.digest)
        name = f"blobs/sha256-{entry.digest}"
        if h is None:
            raise BundleRejected(f"{name} is missing from the tar", code="missing_blob")
        if h.size != entry.size:
            raise BundleRejected(f"{name}: the tar holds {h.size} bytes, bundle.json lists {entry.size}",
                                 code="blob_size_mismatch")
        f = os.fdopen(open_regular(self.tar_path, what=str(self.tar_path)), "rb")
        return _Slice(f, h.offset, h.size)  # type: ignore[return-value]

    def remove(self) -> None:
        """Delete the metadata copied into staging and release the hold on it."""
        shutil.rmtree(self.work, ignore_errors=True)
        self.hold.close()


def _copy_member(f: BinaryIO, h: Header, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    f.seek(h.offset)
    data = f.read(h.size)
    out_fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(out_fd, "wb") as out:
        out.write(data)


def read_bundle_tar(tar_path: Path, staging_dir: Path) -> TarBundle:
    """Check every header and copy the metadata into a fresh staging/tar-<random>/; no blob is read."""
    work = staging_dir / f"tar-{secrets.token_hex(8)}"
    work.mkdir(parents=True)
    bundle = TarBundle(tar_path, work)
    try:
        bundle.hold.enter_context(hold_entry(work))
        with os.fdopen(open_regular(tar_path, what=str(tar_path)), "rb") as f:
            seen: set[str] = set()
            for h in iter_headers(f, os.fstat(f.fileno()).st_size):
                name = _check_name(h.name)
                if name in seen:
                    raise _refuse(f"member {name!r} appears twice")
                seen.add(name)
                if h.kind == DIRECTORY:
                    if name not in DIRS:
                        raise _refuse(f"unexpected directory {name!r}")
                    continue
                if h.kind not in REGULAR:
                    raise _refuse(f"member {name!r} is not a regular file (links and devices are refused)")
                if m := BLOB_RE.fullmatch(name):
                    bundle.blobs[m.group(1)] = h
                    continue
                cap = next((c for rx, c in META_CAPS if rx.fullmatch(name)), None)
                if cap is None:
                    raise _refuse(f"unexpected member {name!r}")
                if h.size > cap:
                    raise _refuse(f"member {name!r} is too large")
                _copy_member(f, h, work / name)
    except OSError as e:
        bundle.remove()
        raise _bad_tar(f"cannot read {tar_path.name}: {e.strerror}") from e
    except BaseException:
        bundle.remove()
        raise
    log.info("read the headers of %s: %d blobs, metadata in %s", tar_path, len(bundle.blobs), work)
    return bundle
