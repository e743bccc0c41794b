"""What is installed, recoverable from disk alone.

    <state>/sync-state.json       committed sync state, written atomically (see SyncState)
    <state>/releases/<N>/          manifest.json (+ the bundle.json and .sigs it came from)
    <state>/current -> releases/N  relative symlink, replaced atomically
    <state>/trust/root.json        the trusted root document

The daemon reads the served families with `read_current_release(state_dir)`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.store import ModelStore
from sync.fsutil import atomic_write, fsync_dir, pretty_json
from sync.policy import Policy, load_policy

log = logging.getLogger(__name__)

STATE_FILE = "sync-state.json"
RELEASE_FORMAT = 1


@dataclass
class SyncState:
    """Committed state: current and previous release, anti-replay floor, pending import marker."""

    current: int | None = None
    previous: int | None = None
    highest_sequence: int = 0
    highest_digest: str | None = None
    newest_created: float = 0.0
    pending: dict[str, Any] | None = None

    @classmethod
    def load(cls, state_dir: Path) -> SyncState:
        """Read sync-state.json; a missing file is the empty state (fresh box)."""
        try:
            data = json.loads((state_dir / STATE_FILE).read_text())
        except FileNotFoundError:
            return cls()
        return cls(**{k: data[k] for k in data if k in cls.__dataclass_fields__})

    def save(self, state_dir: Path) -> None:
        """Write the state atomically (temp file, fsync, rename, dir fsync)."""
        atomic_write(state_dir / STATE_FILE, pretty_json(asdict(self)))


@dataclass(frozen=True)
class Release:
    """An installed release as releases/<N>/manifest.json describes it."""

    sequence: int
    version: str
    bundle_digest: str
    families: dict[str, list[dict[str, Any]]]
    policy_digest: str
    path: Path
    raw: dict[str, Any] = field(repr=False)

    @property
    def blobs(self) -> set[str]:
        """Every digest the release references (models and policy)."""
        return {v["digest"] for vs in self.families.values() for v in vs} | {self.policy_digest}

    def policy(self, store: ModelStore) -> Policy:
        """Load and validate this release's policy from the store."""
        return load_policy(store.blob_path(self.policy_digest))


def releases_dir(state_dir: Path) -> Path:
    """Directory holding releases/<N>/."""
    return state_dir / "releases"


def read_release(path: Path) -> Release:
    """Read releases/<N>/manifest.json."""
    data = json.loads((path / "manifest.json").read_text())
    return Release(sequence=int(data["sequence"]), version=str(data["version"]),
                   bundle_digest=str(data["bundle_digest"]), families=data["families"],
                   policy_digest=str(data["policy"]), path=path, raw=data)


def release_by_sequence(state_dir: Path, sequence: int | None) -> Release | None:
    """The release with this sequence, or None."""
    if sequence is None:
        return None
    p = releases_dir(state_dir) / str(sequence)
    return read_release(p) if (p / "manifest.json").is_file() else None


def read_current_release(state_dir: str | os.PathLike[str]) -> Release | None:
    """The release `current` points to, or None on a box with no release yet."""
    link = Path(state_dir) / "current"
    if not link.is_symlink():
        return None
    return read_release(link.resolve())


def write_release(state_dir: Path, manifest_doc: dict[str, Any], bundle_raw: bytes, sigs_raw: bytes) -> Path:
    """Build releases/<N>/ via a temp dir and an atomic rename; return its path."""
    rdir = releases_dir(state_dir)
    rdir.mkdir(exist_ok=True)
    n = int(manifest_doc["sequence"])
    final, tmp = rdir / str(n), rdir / f".{n}.tmp"
    for p in (tmp, final):  # leftovers of a crashed attempt at this same sequence (never current)
        shutil.rmtree(p, ignore_errors=True)
    tmp.mkdir()
    for name, data in (("manifest.json", pretty_json(manifest_doc)), ("bundle.json", bundle_raw),
                       ("bundle.json.sigs", sigs_raw)):
        atomic_write(tmp / name, data)
    os.rename(tmp, final)
    fsync_dir(rdir)
    return final


def switch_current(state_dir: Path, sequence: int | None) -> None:
    """Point `current` at releases/<sequence> (or remove it) atomically via symlink + rename."""
    link = state_dir / "current"
    if sequence is None:
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
    else:
        tmp = state_dir / ".current.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(f"releases/{sequence}", tmp)
        os.replace(tmp, link)
    fsync_dir(state_dir)


def current_target(state_dir: Path) -> int | None:
    """The sequence `current` points to, or None."""
    link = state_dir / "current"
    if not link.is_symlink():
        return None
    return int(os.readlink(link).rsplit("/", 1)[-1])
