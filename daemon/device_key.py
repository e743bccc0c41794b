"""The box's own Ed25519 device key: created at first start (0600), signs audit checkpoints.

Files in the state dir: `device-key.pem` (PKCS#8 private key, mode 0600, never leaves the
box) and `device-key.pub.pem` (SubjectPublicKeyInfo, for auditors). The key id is the
first 16 hex digits of SHA-256 over the raw 32-byte public key.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtime.errors import AtollError

log = logging.getLogger(__name__)

PRIVATE_NAME = "device-key.pem"
PUBLIC_NAME = "device-key.pub.pem"


class DeviceKeyError(AtollError):
    """The device key cannot be read or is not an Ed25519 key."""

    code = "device_key_unusable"


def key_id(public: Ed25519PublicKey) -> str:
    """Short id of a public key: 16 hex digits of SHA-256 over its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> bytes:
    """PEM (SubjectPublicKeyInfo) of a public key."""
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def ensure(state_dir: Path) -> Ed25519PrivateKey:
    """Load the device key, creating it (mode 0600, O_EXCL) on first start."""
    path = state_dir / PRIVATE_NAME
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return load(state_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        (state_dir / PUBLIC_NAME).write_bytes(public_pem(key.public_key()))
        log.info("created the device key %s (id %s)", path, key_id(key.public_key()))
        return key
    return load(state_dir)


def load(state_dir: Path) -> Ed25519PrivateKey:
    """Load the existing device key; DeviceKeyError naming the file when it is unusable."""
    path = state_dir / PRIVATE_NAME
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise DeviceKeyError(f"cannot read the device key {path}: {e.strerror}") from None
    except ValueError:
        raise DeviceKeyError(f"the device key {path} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise DeviceKeyError(f"the device key {path} is not an Ed25519 key")
    if os.stat(path).st_mode & 0o077:
        log.warning("the device key %s is readable by others; it should be mode 0600", path)
    pub = state_dir / PUBLIC_NAME
    if not pub.exists():
        pub.write_bytes(public_pem(key.public_key()))
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    """Load a device public key from a PEM file (the private key's file works too)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DeviceKeyError(f"cannot read {path}: {e.strerror}") from None
    try:
        if b"PRIVATE KEY" in data:
            priv = serialization.load_pem_private_key(data, password=None)
            if not isinstance(priv, Ed25519PrivateKey):
                raise ValueError
            return priv.public_key()
        pub = serialization.load_pem_public_key(data)
    except ValueError:
        raise DeviceKeyError(f"{path} is not an Ed25519 key in PEM form") from None
    if not isinstance(pub, Ed25519PublicKey):
        raise DeviceKeyError(f"{path} is not an Ed25519 key")
    return pub
