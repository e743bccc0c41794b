"""Key ids, signature counting and root parsing."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from sync.errors import BundleRejected, TrustError
from sync.keys import PublicKey
from sync.roots import check_self_signed, parse_root
from sync.signatures import Role, require_threshold
from tests.sync.helpers import Keyring, canonical


def test_keyid_is_sha256_of_raw_public_key(keyring: Keyring) -> None:
    k = keyring.bundle_keys[0].public
    assert k.keyid == hashlib.sha256(k.raw).hexdigest()
    pub = json.loads((keyring.dir / "bundle-0.pub.json").read_text())
    assert base64.b64decode(pub["public"]) == k.raw and pub["keyid"] == k.keyid


def test_public_key_with_wrong_keyid_is_refused(keyring: Keyring) -> None:
    obj = keyring.bundle_keys[0].public.to_json()
    obj["keyid"] = "0" * 64
    with pytest.raises(TrustError):
        PublicKey.from_json(obj)


def test_threshold_counts_distinct_keys_of_the_role(keyring: Keyring) -> None:
    ks = keyring.bundle_keys
    keys = {k.public.keyid: k.public for k in ks}
    role = Role(frozenset(keys), 2)
    msg = b"hello"
    sigs = [(k.public.keyid, base64.b64decode(k.sign(msg)["sig"])) for k in ks[:2]]
    assert require_threshold(sigs, msg, keys, role, what="t") == {k.public.keyid for k in ks[:2]}
    with pytest.raises(BundleRejected):
        require_threshold(sigs[:1] * 2, msg, keys, role, what="t")


def test_root_self_signature_and_tamper(keyring: Keyring, tmp_path: Path) -> None:
    doc = keyring.root_doc(1, keyring.root_keys, keyring.bundle_keys)
    check_self_signed(parse_root(json.dumps(doc).encode()))
    doc["signed"]["roles"]["bundle"]["threshold"] = 1  # loosen after signing
    with pytest.raises(BundleRejected) as ei:
        check_self_signed(parse_root(json.dumps(doc).encode()))
    assert ei.value.code == "root_bad_signature"


@pytest.mark.parametrize("mutate", [
    lambda d: d["signed"].update(version=0),
    lambda d: d["signed"].update(extra=1),
    lambda d: d["signed"]["roles"]["root"].update(threshold=4),
    lambda d: d["signed"]["roles"]["root"]["keyids"].append("f" * 64),
    lambda d: d["signed"].update(expires="tomorrow"),
    lambda d: d["signed"]["roles"].pop("bundle"),
])
def test_malformed_roots(keyring: Keyring, mutate) -> None:
    doc = keyring.root_doc(1, keyring.root_keys, keyring.bundle_keys)
    mutate(doc)
    with pytest.raises(BundleRejected) as ei:
        parse_root(json.dumps(doc).encode())
    assert ei.value.code == "malformed_root"


def test_canonical_form_is_what_is_signed(keyring: Keyring) -> None:
    doc = keyring.root_doc(1, keyring.root_keys, keyring.bundle_keys)
    r = parse_root(json.dumps(doc, indent=4).encode())  # whitespace does not matter for roots
    assert r.signed_bytes == canonical(doc["signed"])
