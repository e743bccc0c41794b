"""Fixtures: a keyring, a provisioned box, a box with release 1 installed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sync.apply import SyncManager
from sync.verify import SyncConfig
from tests.sync.helpers import Keyring, make_bundle, write_gguf, write_json


@dataclass
class Box:
    """A provisioned state dir and how to build managers for it."""

    state_dir: Path
    kr: Keyring
    work: Path
    audit_log: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    now: float = field(default_factory=time.time)

    def config(self, **kw: Any) -> SyncConfig:
        """Config with a test clock and small headroom."""
        kw.setdefault("headroom_bytes", 1024)
        kw.setdefault("clock", lambda: self.now)
        return SyncConfig(**kw)

    def manager(self, **kw: Any) -> SyncManager:
        """A SyncManager on this box recording audit events."""
        cfg = kw.pop("config", None) or self.config()
        return SyncManager(self.state_dir, cfg, audit=lambda e, d: self.audit_log.append((e, d)), **kw)

    def gguf(self, salt: str, **kw: Any) -> Path:
        """A fresh tiny GGUF file in the work dir."""
        return write_gguf(self.work / f"{salt}.gguf", salt=salt, **kw)

    def bundle(self, name: str, seq: int, models: dict[str, list[Path]] | None = None, **kw: Any) -> Path:
        """A signed bundle dir in the work dir."""
        return make_bundle(self.work / name, self.kr, seq, models or {"tiny": [self.gguf(f"{name}-m")]}, **kw)


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    """3 root keys and 3 bundle keys, threshold 2 each."""
    kr = Keyring(tmp_path / "keys")
    kr.root_keys = kr.new_keys("root", 3)
    kr.bundle_keys = kr.new_keys("bundle", 3)
    return kr


@pytest.fixture
def box(tmp_path: Path, keyring: Keyring) -> Box:
    """A state dir provisioned with root v1 and no release."""
    state = tmp_path / "state"
    write_json(state / "trust" / "root.json", keyring.root_doc(1, keyring.root_keys, keyring.bundle_keys))
    work = tmp_path / "work"
    work.mkdir()
    return Box(state, keyring, work)


@pytest.fixture
async def installed(box: Box) -> Box:
    """The box with bundle sequence 1 installed."""
    res = await box.manager().import_bundle(box.bundle("b1", 1))
    assert res.status == "installed"
    return box

