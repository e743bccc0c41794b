"""Builders for sync tests: real Ed25519 keys, real root documents, tiny valid GGUF files, bundles."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from sync.builder import create_bundle, sign_bundle
from sync.fsutil import canonical_json
from sync.keys import SigningKey, generate_key, load_signing_key
from sync.policy import EXAMPLE_POLICY
from sync.roots import new_root_document, sign_root_document

DAY = 86400.0

#: The shipped example policy, allowing the families these tests use.
POLICY = EXAMPLE_POLICY.read_text().replace('allowed_families = ["smollm2"]', 'allowed_families = ["tiny", "tiny2"]')


def _gguf_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def write_gguf(path: Path, *, salt: str, n_floats: int = 64, ctx: int = 256) -> Path:
    """A tiny but valid GGUF v3 file: three metadata keys and one F32 tensor."""
    kv = b"".join([
        _gguf_str("general.architecture") + struct.pack("<I", 8) + _gguf_str("llama"),
        _gguf_str("general.file_type") + struct.pack("<I", 4) + struct.pack("<I", 0),
        _gguf_str("llama.context_length") + struct.pack("<I", 4) + struct.pack("<I", ctx),
        _gguf_str("test.salt") + struct.pack("<I", 8) + _gguf_str(salt),
    ])
    tensor = _gguf_str("t0") + struct.pack("<IQIQ", 1, n_floats, 0, 0)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 4) + kv + tensor
    head += b"\0" * (-len(head) % 32)
    data = hashlib.sha256(salt.encode()).digest() * (n_floats * 4 // 32 + 1)
    path.write_bytes(head + data[: n_floats * 4])
    return path


@dataclass
class Keyring:
    """Root and bundle keys on disk plus the root documents made from them."""

    dir: Path
    root_keys: list[SigningKey] = field(default_factory=list)
    bundle_keys: list[SigningKey] = field(default_factory=list)

    def new_keys(self, prefix: str, n: int) -> list[SigningKey]:
        """Generate n keys named prefix-i."""
        out = []
        for i in range(n):
            generate_key(self.dir, f"{prefix}-{i}")
            out.append(load_signing_key(self.dir / f"{prefix}-{i}.key"))
        return out

    def root_doc(self, version: int, root_keys: list[SigningKey], bundle_keys: list[SigningKey], *,
                 threshold: int = 2, expires: float | None = None, signers: list[SigningKey] | None = None
                 ) -> dict:
        """A root document for these keys, signed by `signers` (default: its own root keys)."""
        doc = new_root_document(
            version, expires or time.time() + 365 * DAY, [k.public for k in root_keys + bundle_keys],
            {"root": ([k.public.keyid for k in root_keys], threshold),
             "bundle": ([k.public.keyid for k in bundle_keys], threshold)})
        for k in signers if signers is not None else root_keys:
            sign_root_document(doc, k)
        return doc


def write_json(path: Path, doc: dict) -> Path:
    """Write a document as the admin tools do."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    return path


def make_bundle(out: Path, kr: Keyring, seq: int, models: dict[str, list[Path]], *, policy: str = POLICY,
                signers: list[SigningKey] | None = None, created: float | None = None,
                expires: float | None = None, root_chain: tuple[Path, ...] = (), root_version: int = 1,
                product: str = "atoll", compatible: tuple[str, ...] = ("*",)) -> Path:
    """Create and sign a bundle directory (the 'stick'); return it."""
    pol = out.parent / f"{out.name}-policy.toml"
    pol.write_text(policy)
    create_bundle(out, models=models, policy=pol, sequence=seq, expires=expires or time.time() + 30 * DAY,
                  created=created, root_chain=root_chain, root_version=root_version, product=product,
                  compatible=compatible)
    for k in kr.bundle_keys[:2] if signers is None else signers:
        sign_bundle(out, k)
    return out


def snapshot(root: Path) -> dict[str, tuple[str, str]]:
    """Every path under root with its type and content hash (or link target), for byte-for-byte comparison."""
    snap: dict[str, tuple[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                snap[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                snap[rel] = ("dir", oct(p.stat().st_mode & 0o777))
            else:
                snap[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return snap


def canonical(doc: dict) -> bytes:
    """Re-export for tests that forge signatures."""
    return canonical_json(doc)
