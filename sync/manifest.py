"""The bundle manifest (ATOLL/bundle.json): parsing and strict validation.

Unknown keys, wrong types and inconsistent references are refused; every digest is
64 lower-case hex characters, so no name built from it can be a path. The exact bytes
of the file are what the signatures cover. See sync/FORMAT.md.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any

from runtime.store import DIGEST_RE, FAMILY_RE
from sync.errors import BundleRejected
from sync.fsutil import parse_time, strict_json

log = logging.getLogger(__name__)

SCHEMA = 1
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_FILES = 256
MAX_FILE_SIZE = 1 << 40
KINDS = ("gguf", "policy")
TASKS = ("generate", "embed")
VERSION_RE = re.compile(r"^[0-9]+(\.[0-9]+){0,3}$")
TOP_KEYS = {"schema", "product", "compatible", "sequence", "version", "created", "expires",
            "min_daemon_version", "root_version", "files", "models", "policy"}
VARIANT_KEYS = {"digest": str, "quant": str, "ctx": int, "task": str, "source_name": str}


@dataclass(frozen=True)
class FileEntry:
    """One payload file: its digest, exact size and kind."""

    digest: str
    size: int
    kind: str


@dataclass(frozen=True)
class Manifest:
    """A validated bundle manifest plus the digest of its exact bytes."""

    schema: int
    product: str
    compatible: tuple[str, ...]
    sequence: int
    version: str
    created: float
    expires: float
    min_daemon_version: str
    root_version: int
    files: tuple[FileEntry, ...]
    models: dict[str, list[dict[str, Any]]]
    policy: str
    raw: bytes

    @property
    def digest(self) -> str:
        """SHA-256 of the exact manifest bytes (identifies the bundle)."""
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def total_size(self) -> int:
        """Sum of all payload sizes."""
        return sum(f.size for f in self.files)


def _refuse(msg: str) -> BundleRejected:
    return BundleRejected(f"bundle.json: {msg}", code="bad_manifest")


def _int(v: Any, name: str, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _refuse(f"{name} must be an integer in {lo}..{hi}")
    return v


def _str(v: Any, name: str, max_len: int = 128) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= max_len or not v.isprintable():
        raise _refuse(f"{name} must be a printable string of 1..{max_len} characters")
    return v


def _digest(v: Any, name: str) -> str:
    if not isinstance(v, str) or not DIGEST_RE.fullmatch(v):
        raise _refuse(f"{name} must be 64 lower-case hex characters, got {v!r}"[:200])
    return v


def parse_manifest(raw: bytes) -> Manifest:
    """Validate bundle.json bytes (already size-capped) and return the Manifest."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleRejected(f"bundle.json is larger than {MAX_MANIFEST_BYTES} bytes", code="oversized_file")
    doc = strict_json(raw, what="bundle.json")
    if not isinstance(doc, dict):
        raise _refuse("must be a JSON object")
    if set(doc) != TOP_KEYS:
        extra, missing = sorted(set(doc) - TOP_KEYS), sorted(TOP_KEYS - set(doc))
        raise _refuse(f"unknown keys {extra}, missing keys {missing}")
    if type(doc["schema"]) is not int:  # a bool is not an int, and 1.0 is not 1
        raise _refuse(f"schema must be the integer {SCHEMA}, got {doc['schema']!r}"[:200])
    if doc["schema"] != SCHEMA:
        raise BundleRejected(f"bundle.json schema {doc['schema']!r} is not supported (want {SCHEMA})",
                             code="unsupported_schema")
    compatible = doc["compatible"]
    if not isinstance(compatible, list) or not compatible:
        raise _refuse("compatible must be a non-empty list of device classes")
    mdv = _str(doc["min_daemon_version"], "min_daemon_version", 32)
    if not VERSION_RE.fullmatch(mdv):
        raise _refuse("min_daemon_version must look like 0.1.0")
    files: list[FileEntry] = []
    if not isinstance(doc["files"], list) or not 0 < len(doc["files"]) <= MAX_FILES:
        raise _refuse(f"files must be a list of 1..{MAX_FILES} entries")
    for i, f in enumerate(doc["files"]):
        if not isinstance(f, dict) or set(f) != {"digest", "size", "kind"}:
            raise _refuse(f"files[{i}] must hold exactly digest, size, kind")
        if f["kind"] not in KINDS:
            raise _refuse(f"files[{i}].kind must be one of {', '.join(KINDS)}")
        files.append(FileEntry(_digest(f["digest"], f"files[{i}].digest"),
                               _int(f["size"], f"files[{i}].size", 1, MAX_FILE_SIZE), f["kind"]))
    by_digest = {f.digest: f for f in files}
    if len(by_digest) != len(files):
        raise _refuse("a digest is listed twice in files")
    policy = _digest(doc["policy"], "policy")
    if by_digest.get(policy, FileEntry("", 0, "")).kind != "policy":
        raise _refuse("policy must name a file of kind 'policy'")
    models: dict[str, list[dict[str, Any]]] = {}
    if not isinstance(doc["models"], dict):
        raise _refuse("models must map family -> list of variants")
    used = {policy}
    for fam, variants in doc["models"].items():
        if not FAMILY_RE.fullmatch(fam):
            raise _refuse(f"bad family name {fam!r}")
        if not isinstance(variants, list) or not variants:
            raise _refuse(f"models.{fam} must be a non-empty list of variants")
        out = []
        for j, v in enumerate(variants):
            where = f"models.{fam}[{j}]"
            if not isinstance(v, dict) or "digest" not in v or set(v) - set(VARIANT_KEYS):
                raise _refuse(f"{where} must hold digest and optionally {', '.join(list(VARIANT_KEYS)[1:])}")
            for k, typ in VARIANT_KEYS.items():
                if k in v and (not isinstance(v[k], typ) or isinstance(v[k], bool)):
                    raise _refuse(f"{where}.{k} must be {typ.__name__}")
            d = _digest(v["digest"], f"{where}.digest")
            if by_digest.get(d, FileEntry("", 0, "")).kind != "gguf":
                raise _refuse(f"{where}.digest is not a listed gguf file")
            if "task" in v and v["task"] not in TASKS:
                raise _refuse(f"{where}.task must be one of {', '.join(TASKS)}")
            if "ctx" in v:
                _int(v["ctx"], f"{where}.ctx", 1, 1 << 24)
            used.add(d)
            out.append({**v, "size": by_digest[d].size})
        models[fam] = out
    if unused := sorted(set(by_digest) - used):
        raise _refuse(f"files lists digests nothing references: {unused}")
    return Manifest(
        schema=SCHEMA, product=_str(doc["product"], "product", 64),
        compatible=tuple(_str(c, "compatible[]", 64) for c in compatible),
        sequence=_int(doc["sequence"], "sequence", 1, 2**53), version=_str(doc["version"], "version"),
        created=parse_time(doc["created"], field="bundle.json: created", code="bad_manifest"),
        expires=parse_time(doc["expires"], field="bundle.json: expires", code="bad_manifest"),
        min_daemon_version=mdv, root_version=_int(doc["root_version"], "root_version", 1, 2**31),
        files=tuple(files), models=models, policy=policy, raw=raw)
