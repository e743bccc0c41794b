"""The admin side: build a bundle directory, add signatures, check it against a root.

    create_bundle(out, models={"smollm2": [Path("a.gguf")]}, policy=Path("policy.toml"),
                  sequence=7, expires=time.time() + 90 * 86400)
    sign_bundle(out, load_signing_key(Path("release-1.key")))   # once per signer (k-of-n)
    check_bundle(out, root_path=Path("trust/1.root.json"))      # what the box will check
    newest_root(Path("roots/"))                                 # the admin's newest root (its version signs)
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hardware.gguf import GGUFError, read_gguf
from runtime.store import ModelStore, validate_family
from sync.errors import AlreadyInstalled, TrustError
from sync.fsutil import atomic_write, format_time, pretty_json, read_capped, strict_json
from sync.keys import SigningKey
from sync.manifest import MAX_MANIFEST_BYTES, SCHEMA, Manifest, parse_manifest
from sync.policy import parse_policy
from sync.roots import MAX_ROOT_BYTES, ROOT_NAME_RE, Root, parse_root
from sync.signatures import parse_signatures
from sync.verify import SyncConfig, check_contents, check_not_future, find_atoll_dir, verify_bundle

log = logging.getLogger(__name__)


def _ingest_to(blobs: Path, src: Path) -> tuple[str, int]:
    """Copy a file into blobs/ under its digest (reusing the store's hashing copy)."""
    store = ModelStore(blobs.parent)
    store.blobs_dir, store.staging_dir = blobs, blobs.parent / ".staging"
    with src.open("rb") as f:
        digest, size = store.ingest(f)
    shutil.rmtree(store.staging_dir, ignore_errors=True)
    return digest, size


def create_bundle(out: Path, *, models: dict[str, list[Path]], policy: Path, sequence: int, expires: float,
                  version: str | None = None, product: str = "atoll", compatible: tuple[str, ...] = ("*",),
                  min_daemon_version: str = "0.1.0", root_version: int = 1,
                  root_chain: tuple[Path, ...] = (), created: float | None = None) -> Manifest:
    """Write out/ATOLL/{bundle.json, blobs/, root/} from local files; the result is unsigned."""
    atoll = out / "ATOLL"
    if atoll.exists():
        raise TrustError(f"{atoll} already exists")
    if created is not None:
        check_not_future(created, time.time())
    pol_bytes = policy.read_bytes()
    parse_policy(pol_bytes)
    (atoll / "blobs").mkdir(parents=True)
    files: list[dict[str, Any]] = []
    pdigest, psize = _ingest_to(atoll / "blobs", policy)
    files.append({"digest": pdigest, "size": psize, "kind": "policy"})
    fams: dict[str, list[dict[str, Any]]] = {}
    for fam, paths in models.items():
        validate_family(fam)
        for p in paths:
            try:
                info = read_gguf(p)
            except GGUFError as e:
                raise TrustError(f"{p}: {e}") from e
            digest, size = _ingest_to(atoll / "blobs", p)
            if all(f["digest"] != digest for f in files):
                files.append({"digest": digest, "size": size, "kind": "gguf"})
            v: dict[str, Any] = {"digest": digest, "quant": info.quantization, "source_name": p.name}
            if info.context_length:
                v["ctx"] = int(info.context_length)
            fams.setdefault(fam, []).append(v)
    if root_chain:
        (atoll / "root").mkdir()
        for rp in root_chain:
            r = parse_root(rp.read_bytes(), what=str(rp))
            shutil.copyfile(rp, atoll / "root" / f"{r.version}.root.json")
            root_version = max(root_version, r.version)
    now = time.time() if created is None else created
    doc = {"schema": SCHEMA, "product": product, "compatible": list(compatible), "sequence": sequence,
           "version": version or f"{sequence}", "created": format_time(now), "expires": format_time(expires),
           "min_daemon_version": min_daemon_version, "root_version": root_version, "files": files,
           "models": fams, "policy": pdigest}
    raw = pretty_json(doc)
    atomic_write(atoll / "bundle.json", raw)
    m = parse_manifest(raw)
    log.info("created bundle %d in %s (%d files, %d bytes)", sequence, out, len(files), m.total_size)
    return m


def sign_bundle(path: Path, key: SigningKey) -> list[str]:
    """Add `key`'s signature over the exact bytes of bundle.json; return the key ids that have signed."""
    atoll = find_atoll_dir(path)
    raw = (atoll / "bundle.json").read_bytes()
    check_not_future(parse_manifest(raw).created, time.time())  # a wrong clock upstream must not get signed
    sigs_path = atoll / "bundle.json.sigs"
    sigs: list[dict[str, str]] = json.loads(sigs_path.read_text()) if sigs_path.exists() else []
    sig = key.sign(raw)
    sigs = [s for s in sigs if s["keyid"] != sig["keyid"]] + [sig]
    atomic_write(sigs_path, pretty_json(sigs))
    return [s["keyid"] for s in sigs]


@dataclass(frozen=True)
class CheckReport:
    """What `bundle verify` found."""

    sequence: int
    version: str
    root_version: int
    signers: list[str]
    files: int
    bytes: int
    already_installed: bool = False


def check_bundle(path: Path, *, root_path: Path | None = None, state_dir: Path | None = None,
                 config: SyncConfig | None = None) -> CheckReport:
    """Run the box's own checks and hash every blob it would copy; raise the box's refusal if bad.

    With `state_dir` (a box's state, or a copy of it) every check the box applies runs:
    sequence floors, time floor, free space. With only `root_path` the bundle is checked as a
    freshly provisioned box with that root would check it. Nothing is written either way.
    """
    cfg = config or SyncConfig()
    with tempfile.TemporaryDirectory(prefix="atoll-verify-") as tmp:
        if state_dir is None:
            if root_path is None:
                raise TrustError("give a root document (--root) or a box state dir (--state-dir)")
            sd = Path(tmp)
            (sd / "trust").mkdir()
            shutil.copyfile(root_path, sd / "trust" / "root.json")
        else:
            sd = state_dir
        try:
            vb = verify_bundle(path, sd, cfg, check_space=state_dir is not None)
        except AlreadyInstalled:
            m = parse_manifest(read_capped(find_atoll_dir(path) / "bundle.json", MAX_MANIFEST_BYTES,
                                           what="bundle.json"))
            return CheckReport(m.sequence, m.version, m.root_version, [], len(m.files), m.total_size, True)
        check_contents(vb, state_dir)
    check_not_future(vb.manifest.created, cfg.clock(), cfg.clock_tolerance)
    sigs = parse_signatures(strict_json(vb.sigs_raw, what="sigs"), what="sigs")
    signers = sorted({k for k, s in sigs if k in vb.root.keys and vb.root.keys[k].verify(s, vb.manifest.raw)})
    return CheckReport(vb.manifest.sequence, vb.manifest.version, vb.root.version, signers,
                       len(vb.manifest.files), vb.manifest.total_size)


def newest_root(path: Path) -> Root:
    """The root document at `path`, or the newest `<N>.root.json` in the directory `path`."""
    if path.is_dir():
        files = root_files(path)
        if not files:
            raise TrustError(f"no <N>.root.json file in {path}")
        path = files[-1]
    return parse_root(read_capped(path, MAX_ROOT_BYTES, what=str(path)), what=str(path))


def root_files(directory: Path) -> tuple[Path, ...]:
    """The `<N>.root.json` files of a directory, by version."""
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := ROOT_NAME_RE.fullmatch(p.name))]
    return tuple(p for _, p in sorted(found))


def digest_file(path: Path) -> str:
    """Hex SHA-256 of a file (for admins comparing bundles)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
