"""Trust roots: which keys may sign bundles and roots, and the rotation chain.

A root document is `{"signed": {...}, "signatures": [{keyid, sig}]}`; signatures cover
the canonical JSON of "signed" (sorted keys, no spaces, ASCII). Root N+1 is accepted only
if version is exactly N+1 and it carries a threshold of valid signatures from root N's
"root" role and from its own "root" role (the TUF rule). Only the newest root's expiry
matters; an expired trusted root accepts nothing until a bundle brings a fresh one.

A root may carry `"reset_floors": true`: when a box adopts it (through a chain), its
anti-replay sequence floor and its time floor start again from zero. This is how the
site's root keys recover from a bundle signer's mistake (a sequence of 2^53, a bundle
dated in 2100). Replays stay impossible: every bundle signed before it names an older
`root_version` and is refused `root_version_mismatch`.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sync.errors import BundleRejected, TrustError
from sync.fsutil import canonical_json, format_time, parse_time, read_capped, strict_json
from sync.keys import PublicKey, SigningKey
from sync.signatures import Role, parse_signatures, require_threshold

log = logging.getLogger(__name__)

ROLES = ("root", "bundle")
ROOT_TYPE = "atoll-root"
MAX_ROOT_BYTES = 256 * 1024
MAX_ROTATIONS = 16
MAX_KEYS = 64
SIGNED_KEYS = frozenset({"type", "version", "expires", "keys", "roles"})
ROOT_NAME_RE = re.compile(r"^([1-9][0-9]{0,8})\.root\.json$")


@dataclass(frozen=True)
class Root:
    """A parsed trust root (signatures checked separately)."""

    version: int
    expires: float
    keys: dict[str, PublicKey]
    roles: dict[str, Role]
    signatures: list[tuple[str, bytes]] = field(repr=False)
    signed_bytes: bytes = field(repr=False)
    raw: bytes = field(repr=False)
    reset_floors: bool = False


@dataclass(frozen=True)
class Chain:
    """The newest trusted root after walking a bundle's chain, and whether a root on it resets the floors."""

    root: Root
    rotated: bool
    reset_floors: bool


def _bad(msg: str) -> BundleRejected:
    return BundleRejected(msg, code="malformed_root")


def parse_root(raw: bytes, *, what: str = "root") -> Root:
    """Parse and structurally validate a root document (no signature check)."""
    doc = strict_json(raw, what=what, code="malformed_root")
    if not isinstance(doc, dict) or set(doc) != {"signed", "signatures"}:
        raise _bad(f"{what}: expected exactly 'signed' and 'signatures'")
    s = doc["signed"]
    if not isinstance(s, dict) or not SIGNED_KEYS <= set(s) <= SIGNED_KEYS | {"reset_floors"}:
        raise _bad(f"{what}: 'signed' must hold exactly type, version, expires, keys, roles "
                   "(and optionally reset_floors)")
    reset = s.get("reset_floors", False)
    if type(reset) is not bool:
        raise _bad(f"{what}: reset_floors must be true or false")
    if s["type"] != ROOT_TYPE:
        raise _bad(f"{what}: type must be {ROOT_TYPE!r}")
    version = s["version"]
    if type(version) is not int or version < 1:
        raise _bad(f"{what}: version must be a positive integer")
    expires = parse_time(s["expires"], field=f"{what}.expires", code="malformed_root")
    if not isinstance(s["keys"], dict) or not 0 < len(s["keys"]) <= MAX_KEYS:
        raise _bad(f"{what}: keys must be an object of 1..{MAX_KEYS} keys")
    keys: dict[str, PublicKey] = {}
    for kid, kobj in s["keys"].items():
        try:
            pk = PublicKey.from_json({**kobj, "keyid": kid} if isinstance(kobj, dict) else kobj)
        except TrustError as e:
            raise _bad(f"{what}: key {kid!r}: {e.message}") from e
        keys[kid] = pk
    if not isinstance(s["roles"], dict) or set(s["roles"]) != set(ROLES):
        raise _bad(f"{what}: roles must be exactly {', '.join(ROLES)}")
    roles: dict[str, Role] = {}
    for name, r in s["roles"].items():
        if not isinstance(r, dict) or set(r) != {"keyids", "threshold"}:
            raise _bad(f"{what}: role {name} must hold keyids and threshold")
        kids, th = r["keyids"], r["threshold"]
        if not isinstance(kids, list) or not all(isinstance(k, str) and k in keys for k in kids) \
                or len(set(kids)) != len(kids):
            raise _bad(f"{what}: role {name}: keyids must be distinct ids from 'keys'")
        if type(th) is not int or not 1 <= th <= len(kids):
            raise _bad(f"{what}: role {name}: threshold must be 1..{len(kids)}")
        roles[name] = Role(frozenset(kids), th)
    sigs = parse_signatures(doc["signatures"], what=what)
    return Root(version, expires, keys, roles, sigs, canonical_json(s), raw, reset)


def check_self_signed(root: Root, *, what: str = "root") -> None:
    """Require a threshold of the root's own root-role keys (used at provisioning)."""
    require_threshold(root.signatures, root.signed_bytes, root.keys, root.roles["root"],
                      what=what, code_prefix="root_")


def check_successor(old: Root, new: Root, *, what: str) -> None:
    """Accept `new` as the successor of `old`: version +1, signed by both old and new root thresholds."""
    if new.version != old.version + 1:
        raise BundleRejected(f"{what}: version {new.version} does not follow {old.version}",
                             code="root_version_gap")
    try:
        require_threshold(new.signatures, new.signed_bytes, old.keys, old.roles["root"],
                          what=f"{what} (old root v{old.version} keys)")
    except BundleRejected as e:
        raise BundleRejected(e.message, code="root_not_signed_by_old") from e
    try:
        require_threshold(new.signatures, new.signed_bytes, new.keys, new.roles["root"],
                          what=f"{what} (its own keys)")
    except BundleRejected as e:
        raise BundleRejected(e.message, code="root_not_signed_by_new") from e


def walk_chain(trusted: Root, root_dir: Path, *, max_rotations: int = MAX_ROTATIONS) -> Chain:
    """Follow `<N>.root.json` in root_dir from trusted.version+1 upward; return the newest trusted root.

    Expiry is not checked here: the caller knows the box's time floor, which a root on the
    chain may reset (check_root_expiry).
    """
    versions: set[int] = set()
    if root_dir.is_dir() and not root_dir.is_symlink():
        for name in os.listdir(root_dir):
            m = ROOT_NAME_RE.fullmatch(name)
            if m and int(m.group(1)) > trusted.version:
                versions.add(int(m.group(1)))
    if len(versions) > max_rotations:
        raise BundleRejected(f"bundle carries {len(versions)} root rotations, at most {max_rotations}",
                             code="too_many_rotations")
    current, reset = trusted, False
    for v in sorted(versions):
        what = f"root/{v}.root.json"
        if v != current.version + 1:
            raise BundleRejected(f"{what}: root v{current.version + 1} is missing from the chain",
                                 code="root_version_gap")
        new = parse_root(read_capped(root_dir / f"{v}.root.json", MAX_ROOT_BYTES, what=what), what=what)
        if new.version != v:
            raise BundleRejected(f"{what} says version {new.version}", code="root_version_gap")
        check_successor(current, new, what=what)
        log.info("root rotation v%d -> v%d verified%s", current.version, new.version,
                 " (it resets the sequence and time floors)" if new.reset_floors else "")
        current, reset = new, reset or new.reset_floors
    return Chain(current, current is not trusted, reset)


def check_root_expiry(root: Root, now: float) -> None:
    """Refuse `root_expired` if the root's expiry is not after `now` (the box's time floor)."""
    if root.expires <= now:
        raise BundleRejected(f"trust root v{root.version} expired at {format_time(root.expires)}",
                             code="root_expired")


def new_root_document(version: int, expires: float, keys: list[PublicKey],
                      roles: dict[str, tuple[list[str], int]], *, reset_floors: bool = False) -> dict[str, Any]:
    """An unsigned root document; roles map name -> (keyids, threshold); reset_floors see the module doc."""
    signed: dict[str, Any] = {
        "type": ROOT_TYPE, "version": version, "expires": format_time(expires),
        "keys": {k.keyid: {"scheme": "ed25519", "public": k.to_json()["public"]} for k in keys},
        "roles": {n: {"keyids": sorted(kids), "threshold": th} for n, (kids, th) in roles.items()},
    }
    if reset_floors:
        signed["reset_floors"] = True
    doc = {"signed": signed, "signatures": []}
    parse_root(canonical_json(doc))  # structural check before anyone signs it
    return doc


def sign_root_document(doc: dict[str, Any], key: SigningKey) -> dict[str, Any]:
    """Add (or replace) `key`'s signature over the canonical 'signed' part."""
    sig = key.sign(canonical_json(doc["signed"]))
    doc["signatures"] = [s for s in doc["signatures"] if s["keyid"] != sig["keyid"]] + [sig]
    return doc
