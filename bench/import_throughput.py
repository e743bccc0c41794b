"""Import throughput of a 1 GB blob vs plain hashlib.sha256 over the same file, in one run.

usage: python -m bench.import_throughput [--size-mb 1024] [--dir /var/tmp]

Builds a signed bundle holding one GGUF model of the given size, hashes the blob with
hashlib (the ceiling: reading + hashing), then imports it into a fresh state dir
(verify, copy while hashing, fsync, rename, release, health check, switch, commit) and
prints both rates and their ratio (goal >= 0.8). Both read from the page cache: the
hashlib pass runs first and warms it, so the comparison isolates our overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

from sync.apply import SyncManager
from sync.builder import sign_bundle
from sync.fsutil import format_time, pretty_json
from sync.keys import generate_key, load_signing_key
from sync.policy import EXAMPLE_POLICY
from sync.roots import new_root_document, sign_root_document
from sync.verify import SyncConfig

CHUNK = 1 << 20
POLICY = EXAMPLE_POLICY.read_bytes().replace(b'allowed_families = ["smollm2"]', b'allowed_families = ["bench"]')


def _s(x: str) -> bytes:
    return struct.pack("<Q", len(x)) + x.encode()


def write_big_gguf(path: Path, size_mb: int) -> tuple[str, int]:
    """A valid GGUF with one F32 tensor of size_mb MiB; return (sha256, size)."""
    n = size_mb * CHUNK // 4
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + _s("general.architecture") + struct.pack("<I", 8)
    head += _s("llama") + _s("t0") + struct.pack("<IQIQ", 1, n, 0, 0)
    head += b"\0" * (-len(head) % 32)
    block = os.urandom(CHUNK)
    h = hashlib.sha256(head)
    with path.open("wb") as f:
        f.write(head)
        for _ in range(size_mb):
            f.write(block)
            h.update(block)
    return h.hexdigest(), len(head) + size_mb * CHUNK


def hash_file(path: Path) -> str:
    """The baseline: read and sha256 the file in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def build(work: Path, size_mb: int) -> tuple[Path, Path, Path]:
    """Keys, a provisioned state dir and a signed bundle; return (stick, state_dir, blob)."""
    keys = work / "keys"
    pub = generate_key(keys, "k")
    key = load_signing_key(keys / "k.key")
    root = new_root_document(1, time.time() + 86400, [pub], {"root": ([pub.keyid], 1),
                                                           "bundle": ([pub.keyid], 1)})
    sign_root_document(root, key)
    state = work / "state"
    (state / "trust").mkdir(parents=True)
    (state / "trust" / "root.json").write_text(json.dumps(root))
    atoll = work / "stick" / "ATOLL"
    (atoll / "blobs").mkdir(parents=True)
    tmp = atoll / "blobs" / "model.tmp"
    digest, size = write_big_gguf(tmp, size_mb)
    blob = atoll / "blobs" / f"sha256-{digest}"
    tmp.rename(blob)
    pd = hashlib.sha256(POLICY).hexdigest()
    (atoll / "blobs" / f"sha256-{pd}").write_bytes(POLICY)
    now = time.time()
    doc = {"schema": 1, "product": "atoll", "compatible": ["*"], "sequence": 1, "version": "bench",
           "created": format_time(now), "expires": format_time(now + 86400), "min_daemon_version": "0.1.0",
           "root_version": 1, "policy": pd, "models": {"bench": [{"digest": digest}]},
           "files": [{"digest": pd, "size": len(POLICY), "kind": "policy"},
                     {"digest": digest, "size": size, "kind": "gguf"}]}
    (atoll / "bundle.json").write_bytes(pretty_json(doc))
    sign_bundle(atoll.parent, key)
    return atoll.parent, state, blob


def main() -> None:
    """Run the benchmark and print both throughputs and the ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory (needs 2x size free)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="atoll-bench-", dir=args.dir))
    try:
        stick, state, blob = build(work, args.size_mb)
        os.sync()  # let writeback of the freshly written bundle finish before timing anything
        size = blob.stat().st_size
        t0 = time.perf_counter()
        hash_file(blob)
        t_hash = time.perf_counter() - t0
        mgr = SyncManager(state, SyncConfig(headroom_bytes=0))
        t0 = time.perf_counter()
        res = asyncio.run(mgr.import_bundle(stick))
        t_import = time.perf_counter() - t0
        assert res.status == "installed"
        mb = size / 1e6
        print(f"blob size        {size / 2**30:.2f} GiB")
        print(f"hashlib.sha256   {mb / t_hash:8.0f} MB/s  ({t_hash:.2f} s)")
        print(f"atoll import     {mb / t_import:8.0f} MB/s  ({t_import:.2f} s, incl. fsync and health check)")
        print(f"ratio            {t_hash / t_import:.2f}  (goal >= 0.8)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
