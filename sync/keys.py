"""Ed25519 signing keys: generation, files on disk, key ids, signing and verifying.

A key id is the lower-case hex SHA-256 of the 32-byte raw public key, so anyone can
recompute it. Private keys are written once (O_EXCL), mode 0600, as unencrypted PKCS#8
PEM, and are never printed or logged. Public keys travel as JSON
`{"keyid": ..., "scheme": "ed25519", "public": <base64 raw key>}`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sync.errors import TrustError

log = logging.getLogger(__name__)

SCHEME = "ed25519"


def keyid_of(public_raw: bytes) -> str:
    """Key id of a raw Ed25519 public key: hex SHA-256 of its 32 bytes."""
    return hashlib.sha256(public_raw).hexdigest()


@dataclass(frozen=True)
class PublicKey:
    """A trusted (or to-be-trusted) Ed25519 public key and its id."""

    keyid: str
    raw: bytes

    @classmethod
    def from_json(cls, obj: object) -> PublicKey:
        """Parse `{"keyid", "scheme", "public"}`; the key id must match the key."""
        if not isinstance(obj, dict) or set(obj) - {"keyid", "scheme", "public"}:
            raise TrustError("public key must be an object with keyid, scheme, public")
        if obj.get("scheme") != SCHEME:
            raise TrustError(f"unsupported key scheme {obj.get('scheme')!r}")
        try:
            raw = base64.b64decode(str(obj.get("public")), validate=True)
        except (binascii.Error, ValueError) as e:
            raise TrustError("public key is not base64") from e
        if len(raw) != 32:
            raise TrustError("an Ed25519 public key is 32 bytes")
        kid = keyid_of(raw)
        if "keyid" in obj and obj["keyid"] != kid:
            raise TrustError(f"keyid {obj['keyid']!r} does not match the key ({kid})")
        return cls(kid, raw)

    def to_json(self) -> dict[str, str]:
        """The key as stored in root documents and .pub.json files."""
        return {"keyid": self.keyid, "scheme": SCHEME, "public": base64.b64encode(self.raw).decode()}

    def verify(self, sig: bytes, message: bytes) -> bool:
        """Whether `sig` is a valid Ed25519 signature of `message` by this key."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(sig, message)
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True)
class SigningKey:
    """A private Ed25519 key loaded from a key file."""

    private: Ed25519PrivateKey

    @property
    def public(self) -> PublicKey:
        """The matching public key."""
        raw = self.private.public_key().public_bytes_raw()
        return PublicKey(keyid_of(raw), raw)

    def sign(self, message: bytes) -> dict[str, str]:
        """A signature entry `{"keyid", "sig"}` (sig base64) over `message`."""
        return {"keyid": self.public.keyid, "sig": base64.b64encode(self.private.sign(message)).decode()}


def generate_key(out_dir: Path, name: str) -> PublicKey:
    """Write `<name>.key` (0600, never overwritten) and `<name>.pub.json` in out_dir; return the key."""
    if not name or "/" in name or name.startswith("."):
        raise TrustError(f"bad key name {name!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    priv = Ed25519PrivateKey.generate()
    pem = priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    key_path = out_dir / f"{name}.key"
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError as e:
        raise TrustError(f"{key_path} already exists; refusing to overwrite a private key") from e
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    pub = SigningKey(priv).public
    (out_dir / f"{name}.pub.json").write_text(json.dumps(pub.to_json(), indent=2) + "\n")
    log.info("generated key %s (%s)", name, pub.keyid)
    return pub


def load_signing_key(path: Path) -> SigningKey:
    """Load a private key file written by generate_key; refuse group/world-readable files."""
    st = path.stat()
    if st.st_mode & 0o077:
        raise TrustError(f"{path} is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it")
    try:
        priv = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as e:
        raise TrustError(f"{path} is not a PEM private key") from e
    if not isinstance(priv, Ed25519PrivateKey):
        raise TrustError(f"{path} is not an Ed25519 key")
    return SigningKey(priv)


def load_public_key(path: Path) -> PublicKey:
    """Load a `.pub.json` public key file."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrustError(f"{path}: cannot read public key: {e}") from e
    return PublicKey.from_json(obj)
