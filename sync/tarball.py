"""Import from a tar file: strict member checks, extraction into staging.

Only the names a bundle may hold are accepted (ATOLL/, ATOLL/bundle.json,
ATOLL/bundle.json.sigs, ATOLL/root/<N>.root.json, ATOLL/blobs/sha256-<hex>), only
regular files and those three directories, no links or devices, no absolute paths or
`..`, each file under its size cap and the whole under `max_total`. Extraction never
uses tarfile's extract(); each file is written with O_EXCL|O_NOFOLLOW. The extracted
tree then goes through the same verification and copy as a stick.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import tarfile
from pathlib import Path

from sync.errors import BundleRejected
from sync.fsutil import open_regular
from sync.manifest import MAX_FILE_SIZE, MAX_MANIFEST_BYTES
from sync.roots import MAX_ROOT_BYTES

log = logging.getLogger(__name__)

MAX_MEMBERS = 1024
DIRS = frozenset({"ATOLL", "ATOLL/root", "ATOLL/blobs"})
FILE_CAPS: tuple[tuple[re.Pattern[str], int], ...] = (
    (re.compile(r"ATOLL/bundle\.json"), MAX_MANIFEST_BYTES),
    (re.compile(r"ATOLL/bundle\.json\.sigs"), 64 * 1024),
    (re.compile(r"ATOLL/root/[1-9][0-9]{0,8}\.root\.json"), MAX_ROOT_BYTES),
    (re.compile(r"ATOLL/blobs/sha256-[0-9a-f]{64}"), MAX_FILE_SIZE),
)


def _refuse(msg: str) -> BundleRejected:
    return BundleRejected(f"tar: {msg}", code="bad_tar_member")


def _check_name(name: str) -> str:
    n = name.removeprefix("./").rstrip("/")
    if name.startswith("/") or "\\" in n or any(p in ("", ".", "..") for p in n.split("/")):
        raise _refuse(f"member name {name!r} is absolute or not normalized")
    return n


def extract_bundle_tar(tar_path: Path, staging_dir: Path, max_total: int = MAX_FILE_SIZE) -> Path:
    """Check every member, extract into a fresh staging/tar-<random>/ and return that directory."""
    fd = open_regular(tar_path, what=str(tar_path))
    work = staging_dir / f"tar-{secrets.token_hex(8)}"
    work.mkdir(parents=True)
    try:
        with os.fdopen(fd, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tf:
            seen: set[str] = set()
            total = 0
            for count, m in enumerate(tf, 1):
                if count > MAX_MEMBERS:
                    raise _refuse(f"more than {MAX_MEMBERS} members")
                name = _check_name(m.name)
                if name in seen:
                    raise _refuse(f"member {name!r} appears twice")
                seen.add(name)
                if m.isdir():
                    if name not in DIRS:
                        raise _refuse(f"unexpected directory {name!r}")
                    (work / name).mkdir(parents=True, exist_ok=True)
                    continue
                if not m.isreg():
                    raise _refuse(f"member {name!r} is not a regular file (links and devices are refused)")
                cap = next((c for rx, c in FILE_CAPS if rx.fullmatch(name)), None)
                if cap is None:
                    raise _refuse(f"unexpected member {name!r}")
                total += m.size
                if m.size > cap or total > max_total:
                    raise _refuse(f"member {name!r} is too large")
                dest = work / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                if src is None:
                    raise _refuse(f"member {name!r} has no data")
                out_fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(out_fd, "wb") as out:
                    left = m.size
                    while left and (chunk := src.read(min(left, 1 << 20))):
                        out.write(chunk)
                        left -= len(chunk)
                    if left:
                        raise _refuse(f"member {name!r} is truncated")
    except tarfile.TarError as e:
        shutil.rmtree(work, ignore_errors=True)
        raise BundleRejected(f"tar: cannot read {tar_path.name}: {e}", code="bad_tar") from e
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("extracted %s into %s", tar_path, work)
    return work
