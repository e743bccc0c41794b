"""Threshold counting of Ed25519 signatures: unique key ids, of the right role, valid."""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from sync.errors import BundleRejected
from sync.keys import PublicKey

log = logging.getLogger(__name__)

MAX_SIGNATURES = 64


@dataclass(frozen=True)
class Role:
    """Key ids allowed to sign for a role and how many distinct ones must."""

    keyids: frozenset[str]
    threshold: int


def parse_signatures(obj: object, *, what: str) -> list[tuple[str, bytes]]:
    """Parse a `[{keyid, sig}]` list into (keyid, raw signature) pairs, malformed sigs kept as b''."""
    if not isinstance(obj, list):
        raise BundleRejected(f"{what}: signatures must be a list", code="malformed_signatures")
    if len(obj) > MAX_SIGNATURES:
        raise BundleRejected(f"{what}: more than {MAX_SIGNATURES} signatures", code="malformed_signatures")
    out: list[tuple[str, bytes]] = []
    for entry in obj:
        if not isinstance(entry, dict) or set(entry) != {"keyid", "sig"} or not all(
                isinstance(v, str) for v in entry.values()):
            raise BundleRejected(f"{what}: each signature is {{keyid, sig}} strings",
                                 code="malformed_signatures")
        try:
            sig = base64.b64decode(entry["sig"], validate=True)
        except (binascii.Error, ValueError):
            sig = b""
        out.append((entry["keyid"], sig))
    return out


def require_threshold(sigs: list[tuple[str, bytes]], message: bytes, keys: Mapping[str, PublicKey],
                      role: Role, *, what: str, code_prefix: str = "") -> frozenset[str]:
    """Valid signers if at least role.threshold distinct role keys signed `message`; else refuse."""
    valid: set[str] = set()
    bad = unknown = wrong_role = dup = 0
    for keyid, sig in sigs:
        if keyid not in keys:
            unknown += 1
            continue
        if keyid not in role.keyids:
            wrong_role += 1
            continue
        if keyid in valid:
            dup += 1
            continue
        if keys[keyid].verify(sig, message):
            valid.add(keyid)
        else:
            bad += 1
    if len(valid) >= role.threshold:
        return frozenset(valid)
    detail = (f"{what}: {len(valid)} valid signature(s) from distinct authorised keys, "
              f"{role.threshold} required ({bad} invalid, {unknown} from unknown keys, "
              f"{wrong_role} from keys of another role, {dup} repeated)")
    if not sigs:
        code = "no_signatures"
    elif bad:
        code = "bad_signature"
    elif unknown and not wrong_role:
        code = "unknown_key"
    elif wrong_role:
        code = "wrong_role"
    else:
        code = "threshold_not_met"
    log.warning("refused: %s", detail)
    raise BundleRejected(detail, code=code_prefix + code)
