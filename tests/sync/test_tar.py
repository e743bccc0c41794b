"""Import from a tar file: same path as a stick, strict member checks."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from sync.errors import BundleRejected
from sync.state import read_current_release
from tests.sync.conftest import Box
from tests.sync.helpers import snapshot


def tar_of(stick: Path, out: Path, extra: Sequence[tuple[tarfile.TarInfo, bytes | None]] = ()) -> Path:
    """Pack stick/ATOLL as ATOLL/... plus extra members."""
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tf:
        tf.add(stick / "ATOLL", arcname="ATOLL")
        for info, data in extra:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


async def test_tar_import_installs(installed: Box) -> None:
    box = installed
    t = tar_of(box.bundle("b2", 2), box.work / "b2.tar")
    assert (await box.manager().import_tar(t)).status == "installed"
    rel = read_current_release(box.state_dir)
    assert rel is not None and rel.sequence == 2
    assert list((box.state_dir / "staging").iterdir()) == []


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = b"x", **kw: object
            ) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if data is not None and kind == tarfile.REGTYPE else 0
    for k, v in kw.items():
        setattr(info, k, v)
    return info, data if kind == tarfile.REGTYPE else None


@pytest.mark.parametrize("member", [
    _member("../evil"),
    _member("/ATOLL/blobs/sha256-" + "a" * 64),
    _member("ATOLL/../ATOLL/bundle.json"),
    _member("ATOLL/blobs/sha256-" + "A" * 64),
    _member("ATOLL/notes.txt"),
    _member("ATOLL/blobs/link", tarfile.SYMTYPE, linkname="/etc/passwd"),
    _member("ATOLL/blobs/sha256-" + "b" * 64, tarfile.SYMTYPE, linkname="/etc/passwd"),
    _member("ATOLL/blobs/sha256-" + "c" * 64, tarfile.LNKTYPE, linkname="ATOLL/bundle.json"),
    _member("ATOLL/blobs/sha256-" + "d" * 64, tarfile.CHRTYPE, devmajor=1, devminor=3),
    _member("ATOLL/blobs/sha256-" + "e" * 64, tarfile.FIFOTYPE),
    _member("ATOLL/bundle.json"),  # a second copy of a member
], ids=["dotdot", "absolute", "dotdot-inside", "uppercase", "unexpected", "symlink", "symlink-blob",
        "hardlink", "device", "fifo", "duplicate"])
async def test_bad_tar_member_is_refused(installed: Box, member: tuple[tarfile.TarInfo, bytes]) -> None:
    box = installed
    t = tar_of(box.bundle("b2", 2), box.work / "bad.tar", [member])
    before = snapshot(box.state_dir)
    with pytest.raises(BundleRejected) as ei:
        await box.manager().import_tar(t)
    assert ei.value.code == "bad_tar_member", ei.value.message
    assert snapshot(box.state_dir) == before


async def test_oversized_manifest_member_is_refused(installed: Box) -> None:
    box = installed
    t = box.work / "big.tar"
    with tarfile.open(t, "w", format=tarfile.USTAR_FORMAT) as tf:
        info, data = _member("ATOLL/bundle.json", data=b" " * (1024 * 1024 + 1))
        tf.addfile(info, io.BytesIO(data or b""))
    before = snapshot(box.state_dir)
    with pytest.raises(BundleRejected) as ei:
        await box.manager().import_tar(t)
    assert ei.value.code == "bad_tar_member"
    assert snapshot(box.state_dir) == before


async def test_not_a_tar(installed: Box) -> None:
    p = installed.work / "junk.tar"
    p.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(BundleRejected) as ei:
        await installed.manager().import_tar(p)
    assert ei.value.code == "bad_tar"
