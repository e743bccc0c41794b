"""Hostile tar files: refused at once by the bounded ustar reader, nothing written (issue 7 item 12).

Each case is a few KB; on CPython's tarfile several hang or write gigabytes before any
signature is checked (pax digits: CVE-2024-6232; sparse members; huge pax headers).
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from runtime.store import ModelStore
from sync.errors import BundleRejected
from sync.manifest import MAX_FILE_SIZE
from sync.recovery import hold_entry
from sync.state import read_current_release
from sync.tarball import MAX_MEMBERS, read_bundle_tar
from tests.sync.conftest import Box
from tests.sync.helpers import snapshot

POSIX, GNU = b"ustar\x0000", b"ustar  \x00"


def header(name: str, size: int, kind: bytes = b"0", *, magic: bytes = POSIX, size_field: bytes | None = None,
           checksum_delta: int = 0) -> bytes:
    """One 512-byte tar header built by hand (so it can say what tarfile would never write)."""
    h = bytearray(512)
    h[0:len(name)] = name.encode()
    h[100:108] = b"0000644\0"
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = size_field if size_field is not None else b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8
    h[156:157] = kind
    h[257:265] = magic
    h[148:156] = b"%06o\0 " % (sum(h) + checksum_delta)
    return bytes(h)


def member(name: str, data: bytes, kind: bytes = b"0", **kw: object) -> bytes:
    """Header plus data padded to the block size."""
    return header(name, len(data), kind, **kw) + data + bytes(-len(data) % 512)  # type: ignore[arg-type]


END = bytes(1024)
DIGITS = b"9" * (1 << 20)  # CPython parses a pax header of this many digits in quadratic time

HOSTILE: dict[str, tuple[bytes, str]] = {
    "pax-1MiB-digits": (member("././@PaxHeader", DIGITS, b"x") + member("ATOLL/bundle.json", b"{}") + END,
                        "bad_tar"),
    "pax-huge-header": (header("././@PaxHeader", 1 << 30, b"x") + b"17 path=ATOLL/x\n", "bad_tar"),
    "pax-global": (member("pax_global_header", b"20 comment=hello!!\n", b"g") + END, "bad_tar"),
    "gnu-longname": (member("././@LongLink", b"ATOLL/" + b"a" * 300, b"L", magic=GNU) + END, "bad_tar"),
    "gnu-longlink": (member("././@LongLink", b"b" * 300, b"K", magic=GNU) + END, "bad_tar"),
    "gnu-sparse": (header("ATOLL/blobs/sha256-" + "a" * 64, 512, b"S", magic=GNU) + bytes(512) + END, "bad_tar"),
    "not-ustar-v7": (member("ATOLL/bundle.json", b"{}", magic=bytes(8)) + END, "bad_tar"),
    "bad-checksum": (member("ATOLL/bundle.json", b"{}", checksum_delta=1) + END, "bad_tar"),
    "size-not-octal": (header("ATOLL/bundle.json", 0, size_field=b"9" * 11 + b"\0") + END, "bad_tar"),
    "size-base256-huge": (header("ATOLL/blobs/sha256-" + "b" * 64, 0,
                                 size_field=b"\x80" + (MAX_FILE_SIZE + 1).to_bytes(11, "big")) + END,
                          "bad_tar_member"),
    "truncated-member": (header("ATOLL/blobs/sha256-" + "c" * 64, 1 << 40) + bytes(512), "bad_tar"),
    "too-many-members": (b"".join(member(f"ATOLL/blobs/sha256-{i:064x}", b"") for i in range(MAX_MEMBERS + 1))
                         + END, "bad_tar_member"),
    "gzip": (gzip.compress(member("ATOLL/bundle.json", b"{}") + END), "bad_tar"),
    "empty": (b"", "bad_tar"),
    "manifest-too-big": (header("ATOLL/bundle.json", 1 << 30) + bytes(1 << 16), "bad_tar"),
    "symlink": (member("ATOLL/bundle.json", b"", b"2") + END, "bad_tar_member"),
    "non-ascii-name": (member("ATOLL/bl\xf6bs", b"x") + END, "bad_tar_member"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_tar_is_refused_and_changes_nothing(installed: Box, case: str) -> None:
    box = installed
    data, code = HOSTILE[case]
    t = box.work / f"{case}.tar"
    t.write_bytes(data)
    before = snapshot(box.state_dir)
    mgr = box.manager()
    with pytest.raises(BundleRejected) as ei:
        await mgr.import_tar(t)
    assert ei.value.code == code, ei.value.message
    assert snapshot(box.state_dir) == before  # staging left empty, no blob written
    assert mgr.progress.phase == "failed" and box.audit_log[-1][0] == "sync.import.rejected"


def _ustar(stick: Path, out: Path, extra: list[bytes] | None = None) -> Path:
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tf:
        tf.add(stick / "ATOLL", arcname="ATOLL")
    if extra:  # insert members before the end-of-archive blocks
        body = out.read_bytes().rstrip(b"\0")
        body += bytes(-len(body) % 512)
        out.write_bytes(body + b"".join(extra) + END)
    return out


def test_reading_headers_writes_only_the_metadata(installed: Box) -> None:
    box = installed
    t = _ustar(box.bundle("b2", 2), box.work / "b2.tar")
    tb = read_bundle_tar(t, ModelStore(box.state_dir).staging_dir)
    try:
        written = sorted(str(p.relative_to(tb.work)) for p in tb.work.rglob("*") if p.is_file())
        assert written == ["ATOLL/bundle.json", "ATOLL/bundle.json.sigs"]
        assert len(tb.blobs) == 2
        assert list(ModelStore(box.state_dir).blobs_dir.iterdir()) != []  # release 1's, untouched
    finally:
        tb.remove()
    assert not tb.work.exists()


async def test_unsigned_tar_is_refused_before_any_blob(installed: Box) -> None:
    box = installed
    stick = box.bundle("b2", 2)
    (stick / "ATOLL" / "bundle.json.sigs").unlink()
    t = _ustar(stick, box.work / "unsigned.tar")
    before = snapshot(box.state_dir)
    with pytest.raises(BundleRejected) as ei:
        await box.manager().import_tar(t)
    assert ei.value.code == "no_signatures"
    assert snapshot(box.state_dir) == before


async def test_unlisted_member_is_skipped_not_written(installed: Box) -> None:
    box = installed
    stray = "ATOLL/blobs/sha256-" + "d" * 64
    t = _ustar(box.bundle("b2", 2), box.work / "extra.tar", [member(stray, b"not listed")])
    assert (await box.manager().import_tar(t)).status == "installed"
    assert not ModelStore(box.state_dir).has_blob("d" * 64)


async def test_blob_member_of_another_size_is_refused(installed: Box) -> None:
    box = installed
    stick = box.bundle("b2", 2)
    store = ModelStore(box.state_dir)
    blob = next(p for p in (stick / "ATOLL" / "blobs").glob("sha256-*") if not store.has_blob(p.name[7:]))
    blob.write_bytes(blob.read_bytes() + b"more")  # the tar holds more bytes than bundle.json lists
    t = _ustar(stick, box.work / "long.tar")
    before = snapshot(box.state_dir)
    with pytest.raises(BundleRejected) as ei:
        await box.manager().import_tar(t)
    assert ei.value.code == "blob_size_mismatch"
    after = snapshot(box.state_dir)
    assert {k: v for k, v in after.items() if not k.startswith(".")} == \
        {k: v for k, v in before.items() if not k.startswith(".")}


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
@pytest.mark.parametrize("fmt", ["gnu", "ustar", "pax"])
async def test_tar_made_by_gnu_tar(installed: Box, fmt: str) -> None:
    """What an admin types: `tar -cf b.tar ATOLL` (gnu format) and --format=ustar work; pax is refused."""
    box = installed
    stick = box.bundle("b2", 2)
    t = box.work / f"{fmt}.tar"
    subprocess.run(["tar", f"--format={fmt}", "-cf", str(t), "-C", str(stick), "ATOLL"], check=True)
    if fmt == "pax":
        with pytest.raises(BundleRejected) as ei:
            await box.manager().import_tar(t)
        assert ei.value.code == "bad_tar"
        return
    assert (await box.manager().import_tar(t)).status == "installed"
    rel = read_current_release(box.state_dir)
    assert rel is not None and rel.sequence == 2


async def test_staging_left_by_a_killed_import_is_cleaned_at_start(box: Box) -> None:
    """A fresh box (no release yet) still cleans what a killed upload/import left in staging."""
    staging = ModelStore(box.state_dir).staging_dir
    staging.mkdir(parents=True)
    (staging / "upload-abc.tar").write_bytes(b"x" * 1000)
    (staging / "ingest-123").write_bytes(b"y")
    (staging / "tar-0011").mkdir()
    (staging / "tar-0011" / "bundle.json").write_text("{}")
    box.manager().recover()
    assert list(staging.iterdir()) == []


def test_start_up_clean_up_leaves_a_live_upload_alone(installed: Box) -> None:
    """`atoll import` run while the daemon receives an upload must not delete the upload."""
    staging = ModelStore(installed.state_dir).staging_dir
    live = staging / "upload-live.tar"
    live.write_bytes(b"x" * 1000)
    dead = staging / "upload-dead.tar"
    dead.write_bytes(b"y")
    with hold_entry(live):
        installed.manager().recover()
        assert live.exists() and not dead.exists()
    installed.manager().recover()
    assert not live.exists()
