"""Small file-system and JSON helpers shared by the sync modules.

Everything that reads from a bundle goes through `open_regular`: no symlinks followed,
regular files only, one link only, read with a cap. JSON from outside is parsed with
duplicate keys refused, and signed JSON is serialized canonically.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

from runtime.store import fsync_dir as fsync_dir  # re-exported: one implementation
from sync.errors import BundleRejected

log = logging.getLogger(__name__)

TIME_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z", re.ASCII)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` via a fsynced temp file, rename and directory fsync."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def open_regular(path: Path, *, what: str) -> int:
    """Open `path` read-only without following symlinks; refuse anything but a single-link regular file."""
    try:
        # O_NONBLOCK so a FIFO planted in place of a file cannot block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise BundleRejected(f"{what} is missing", code="missing_file") from e
    except OSError as e:
        raise BundleRejected(f"{what} cannot be opened safely ({e.strerror}); symlinks are refused",
                             code="unsafe_file") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleRejected(f"{what} is not a regular file", code="unsafe_file")
        if st.st_nlink != 1:
            raise BundleRejected(f"{what} is a hard link ({st.st_nlink} links)", code="unsafe_file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_capped(path: Path, cap: int, *, what: str) -> bytes:
    """Read a whole small file safely; refuse it if it is longer than `cap` bytes."""
    fd = open_regular(path, what=what)
    with os.fdopen(fd, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise BundleRejected(f"{what} is larger than {cap} bytes", code="oversized_file")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def strict_json(data: bytes, *, what: str, code: str = "malformed_manifest") -> Any:
    """Parse UTF-8 JSON refusing duplicate keys, NaN/Infinity and bad encodings."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates,
                          parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BundleRejected(f"{what} is not valid JSON: {e}", code=code) from e


def canonical_json(obj: Any) -> bytes:
    """The canonical serialization signed in root documents: sorted keys, no spaces, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def pretty_json(obj: Any) -> bytes:
    """Human-readable JSON for files an admin may read (still deterministic)."""
    return (json.dumps(obj, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()


def parse_time(value: Any, *, field: str, code: str = "malformed_manifest") -> float:
    """Parse exactly `YYYY-MM-DDTHH:MM:SSZ` (UTC, no fraction, no offset) into epoch seconds.

    Anything else (a bare date, `+14:00Z`, fractions, lower-case `t`/`z`) is refused, so a
    signed time means one thing only.
    """
    if not isinstance(value, str) or not TIME_RE.fullmatch(value):
        raise BundleRejected(f"{field} must be a UTC timestamp exactly like 2026-01-02T03:04:05Z, "
                             f"got {value!r}"[:200], code=code)
    try:
        t = dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError as e:
        raise BundleRejected(f"{field} is not a valid date and time: {value!r}", code=code) from e
    return t.timestamp()


def format_time(epoch: float) -> str:
    """Format epoch seconds as an RFC 3339 UTC timestamp with a Z suffix."""
    return dt.datetime.fromtimestamp(int(epoch), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
