"""Verify a bundle on the stick before anything on the box changes.

Order (each step refuses with BundleRejected and its own code):
read bundle.json and its signatures with size caps -> walk the root chain from the
trusted root -> threshold of distinct valid bundle-role signatures over the exact bytes
-> parse the manifest -> product and device class -> daemon version -> expiry against
the time floor max(clock, newest accepted `created`) -> sequence above the highest
installed (equal and identical: AlreadyInstalled) -> free space for the missing blobs
plus headroom.

The time floor never moves past the box's own clock plus `clock_tolerance` (24 h by
default): a bundle dated in the future is accepted, but it raises the floor only to
clock + tolerance, so one admin laptop with a wrong clock cannot make the box believe
it is 2100 (after which every root and bundle would count as expired). A root on the
chain with `reset_floors` starts the sequence and time floors again (sync/roots.py).

`atoll bundle verify` runs the same `verify_bundle`, then `check_contents` (every blob
the box would copy, hashed with the box's codes; the policy; the GGUF headers).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import InvalidVersion, Version

from hardware.gguf import GGUFError, read_gguf
from runtime.store import COPY_CHUNK, ModelStore
from sync.errors import AlreadyInstalled, BundleRejected, ImportFailed, InsufficientSpace
from sync.fsutil import format_time, open_regular, read_capped, strict_json
from sync.manifest import MAX_MANIFEST_BYTES, FileEntry, Manifest, parse_manifest
from sync.policy import MAX_POLICY_BYTES, parse_policy
from sync.roots import MAX_ROOT_BYTES, MAX_ROTATIONS, Root, check_root_expiry, parse_root, walk_chain
from sync.signatures import parse_signatures, require_threshold
from sync.state import SyncState

log = logging.getLogger(__name__)

MAX_SIGS_BYTES = 64 * 1024
DEFAULT_HEADROOM = 256 * 1024 * 1024
#: How far past the box's own clock a bundle's `created` may raise the time floor (seconds).
DEFAULT_CLOCK_TOLERANCE = 24 * 3600.0


def _default_daemon_version() -> str:
    try:
        from importlib.metadata import version

        return version("atoll")
    except Exception:  # not installed as a distribution (source tree)
        return "0.1.0"


@dataclass(frozen=True)
class SyncConfig:
    """What this box is and how strict to be; built by the daemon from its settings."""

    product: str = "atoll"
    device_class: str = "generic"
    daemon_version: str = field(default_factory=_default_daemon_version)
    headroom_bytes: int = DEFAULT_HEADROOM
    max_rotations: int = MAX_ROTATIONS
    health_timeout: float = 120.0
    clock_tolerance: float = DEFAULT_CLOCK_TOLERANCE
    clock: Callable[[], float] = time.time


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose manifest and signatures passed; its blobs are still unread."""

    atoll_dir: Path
    manifest: Manifest
    sigs_raw: bytes
    root: Root
    rotated: bool
    missing: tuple[FileEntry, ...]
    #: the time floor to commit with this bundle: never past the clock + tolerance
    time_floor: float = 0.0
    #: a root on the chain reset the sequence and time floors
    floors_reset: bool = False


def _too_old(minimum: str, daemon: str) -> bool:
    """PEP 440 comparison, so a daemon built as `0.2.0rc1` or `1.0+site` compares sanely.

    `0+<anything>` is what a source checkout without a release reports: its version is
    unknown, so the check is skipped (with a warning) rather than refusing every bundle.
    """
    try:
        have = Version(daemon)
        if have.release == (0,) and have.local:
            log.warning("daemon version %s is a source build: not checking min_daemon_version %s", daemon, minimum)
            return False
        return Version(minimum) > have
    except InvalidVersion:
        raise BundleRejected(f"this daemon's version {daemon!r} is not a PEP 440 version, so bundle's "
                             f"min_daemon_version {minimum} cannot be checked", code="daemon_too_old") from None


def find_atoll_dir(path: Path) -> Path:
    """Accept the stick's mount point, its ATOLL/ dir or ATOLL/bundle.json; return the ATOLL dir."""
    if path.name == "bundle.json":
        path = path.parent
    if path.name != "ATOLL" and (path / "ATOLL").is_dir():
        path = path / "ATOLL"
    if path.is_symlink() or not (path / "bundle.json").exists():
        raise BundleRejected(f"no ATOLL/bundle.json under {path}", code="not_a_bundle")
    return path


def load_trusted_root(state_dir: Path) -> Root:
    """The root in trust/root.json (installed at provisioning, advanced only by a verified chain)."""
    p = state_dir / "trust" / "root.json"
    if not p.is_file():
        raise BundleRejected(f"no trust root installed at {p}; run `atoll trust init`", code="no_trust_root")
    return parse_root(read_capped(p, MAX_ROOT_BYTES, what=str(p)), what="trust/root.json")


def verify_bundle(path: Path, state_dir: Path, config: SyncConfig, *, check_space: bool = True,
                  state: SyncState | None = None) -> VerifiedBundle:
    """Run every check that needs no blob content; raise BundleRejected or return the VerifiedBundle."""
    atoll = find_atoll_dir(path)
    raw = read_capped(atoll / "bundle.json", MAX_MANIFEST_BYTES, what="bundle.json")
    try:
        sigs_raw = read_capped(atoll / "bundle.json.sigs", MAX_SIGS_BYTES, what="bundle.json.sigs")
    except BundleRejected as e:
        if e.code == "missing_file":
            raise BundleRejected("bundle.json.sigs is missing: the bundle is unsigned",
                                 code="no_signatures") from e
        raise
    st = state or SyncState.load(state_dir)
    trusted = load_trusted_root(state_dir)
    chain = walk_chain(trusted, atoll / "root", max_rotations=config.max_rotations)
    root = chain.root
    clock = config.clock()
    if chain.reset_floors:
        log.warning("root v%d resets the anti-replay floors (sequence %d, time %s)", root.version,
                    st.highest_sequence, format_time(st.newest_created))
        st = SyncState(current=st.current, previous=st.previous, pending=st.pending)
    now = max(clock, st.newest_created)
    check_root_expiry(root, now)
    sigs = parse_signatures(strict_json(sigs_raw, what="bundle.json.sigs", code="malformed_signatures"),
                            what="bundle.json.sigs")
    require_threshold(sigs, raw, root.keys, root.roles["bundle"], what="bundle.json")
    m = parse_manifest(raw)
    if m.root_version != root.version:
        raise BundleRejected(f"bundle was signed under root v{m.root_version}, box trusts v{root.version}",
                             code="root_version_mismatch")
    if m.product != config.product:
        raise BundleRejected(f"bundle is for product {m.product!r}, this box is {config.product!r}",
                             code="wrong_product")
    if "*" not in m.compatible and config.device_class not in m.compatible:
        raise BundleRejected(f"bundle supports {list(m.compatible)}, this box is {config.device_class!r}",
                             code="incompatible_device")
    if _too_old(m.min_daemon_version, config.daemon_version):
        raise BundleRejected(f"bundle needs atoll >= {m.min_daemon_version}, this is {config.daemon_version}",
                             code="daemon_too_old")
    if m.created > m.expires:
        raise BundleRejected("bundle expires before it was created", code="bad_manifest")
    if m.expires <= now:
        raise BundleRejected(f"bundle expired at {format_time(m.expires)} (box time {format_time(now)})",
                             code="bundle_expired")
    if m.sequence < st.highest_sequence:
        raise BundleRejected(f"bundle sequence {m.sequence} is older than installed {st.highest_sequence}",
                             code="sequence_replay")
    if m.sequence == st.highest_sequence:
        if m.digest == st.highest_digest:
            raise AlreadyInstalled(f"bundle {m.sequence} ({m.version}) is already installed")
        raise BundleRejected(f"a different bundle with sequence {m.sequence} is already installed",
                             code="sequence_conflict")
    store = ModelStore(state_dir)
    missing = tuple(f for f in m.files if not store.has_blob(f.digest))
    if check_space:
        need = sum(f.size for f in missing) + config.headroom_bytes
        store.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(store.root).free
        if free < need:
            raise InsufficientSpace(f"need {need} bytes free on the store (incl. {config.headroom_bytes} "
                                    f"headroom), have {free}")
    log.info("bundle %d (%s) verified: %d files, %d to copy",
             m.sequence, m.version, len(m.files), len(missing))
    floor = next_time_floor(st.newest_created, m.created, clock, config.clock_tolerance)
    return VerifiedBundle(atoll, m, sigs_raw, root, chain.rotated, missing, floor, chain.reset_floors)


def next_time_floor(floor: float, created: float, clock: float, tolerance: float) -> float:
    """The time floor after accepting a bundle `created` then: it rises to `created`, never past clock + tolerance."""
    return max(floor, min(created, clock + tolerance))


def check_not_future(created: float, clock: float, tolerance: float = DEFAULT_CLOCK_TOLERANCE) -> None:
    """Signer side: refuse `created_in_future` when a bundle is dated past this machine's clock + tolerance."""
    if created > clock + tolerance:
        raise BundleRejected(
            f"bundle.json is dated {format_time(created)}, after this machine's clock {format_time(clock)} "
            f"(+{tolerance / 3600:g} h): check the clock of the machine that created it, then create it again",
            code="created_in_future")


def check_contents(vb: VerifiedBundle, state_dir: Path | None) -> None:
    """Check what the box checks while copying and health-checking, without writing anything.

    Every blob the box would copy is hashed on the stick (capped at its listed size+1; codes
    missing_blob, unsafe_file, blob_size_mismatch, blob_hash_mismatch); the policy must parse
    (bad_policy); every model must have a complete GGUF header (health_check_failed).
    """
    blobs_dir = vb.atoll_dir / "blobs"
    if blobs_dir.is_symlink():
        raise BundleRejected("ATOLL/blobs is a symlink", code="unsafe_file")
    store = ModelStore(state_dir) if state_dir is not None else None
    missing = {f.digest for f in vb.missing}
    for entry in sorted(vb.manifest.files, key=lambda f: f.kind != "policy"):
        path = blobs_dir / f"sha256-{entry.digest}"
        if entry.digest in missing or store is None:
            _check_blob(path, entry)
        else:
            path = store.blob_path(entry.digest)
        if entry.kind == "policy":
            with path.open("rb") as f:
                parse_policy(f.read(MAX_POLICY_BYTES + 1))
        else:
            try:
                read_gguf(path)
            except GGUFError as e:
                raise ImportFailed(f"model blob sha256-{entry.digest[:12]}: {e}", code="health_check_failed") from e


def _check_blob(path: Path, entry: FileEntry) -> None:
    name = f"blobs/sha256-{entry.digest}"
    try:
        fd = open_regular(path, what=name)
    except BundleRejected as e:
        raise BundleRejected(e.message, code="missing_blob" if e.code == "missing_file" else e.code) from e
    h, size = hashlib.sha256(), 0
    with os.fdopen(fd, "rb") as f:
        while size <= entry.size and (chunk := f.read(COPY_CHUNK)):
            h.update(chunk)
            size += len(chunk)
    if size != entry.size:
        raise BundleRejected(f"{name}: size differs from the listed {entry.size} bytes", code="blob_size_mismatch")
    if h.hexdigest() != entry.digest:
        raise BundleRejected(f"{name}: content does not match its digest", code="blob_hash_mismatch")
