"""Verify a bundle on the stick before anything on the box changes.

Order (each step refuses with BundleRejected and its own code):
read bundle.json and its signatures with size caps -> walk the root chain from the
trusted root -> threshold of distinct valid bundle-role signatures over the exact bytes
-> parse the manifest -> product and device class -> daemon version -> expiry against
max(clock, newest accepted `created`) -> sequence above the highest installed (equal
and identical: AlreadyInstalled) -> free space for the missing blobs plus headroom.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import InvalidVersion, Version

from runtime.store import ModelStore
from sync.errors import AlreadyInstalled, BundleRejected, InsufficientSpace
from sync.fsutil import format_time, read_capped, strict_json
from sync.manifest import MAX_MANIFEST_BYTES, FileEntry, Manifest, parse_manifest
from sync.roots import MAX_ROOT_BYTES, MAX_ROTATIONS, Root, parse_root, walk_chain
from sync.signatures import parse_signatures, require_threshold
from sync.state import SyncState

log = logging.getLogger(__name__)

MAX_SIGS_BYTES = 64 * 1024
DEFAULT_HEADROOM = 256 * 1024 * 1024


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
    now = max(config.clock(), st.newest_created)
    trusted = load_trusted_root(state_dir)
    root = walk_chain(trusted, atoll / "root", now, max_rotations=config.max_rotations)
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
    return VerifiedBundle(atoll, m, sigs_raw, root, root.version != trusted.version, missing)
