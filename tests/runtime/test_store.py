"""runtime/store.py: content-addressed ingest, digest and family validation, the catalog, inspection."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from runtime.store import ModelStore, StoreError, Variant, validate_digest, validate_family
from tests.conftest import snapshot_tree


def make_gguf(path: Path, *, basename: str = "tiny", seed: int = 0, arch: str = "llama") -> Path:
    """A small but complete GGUF file (two F32 tensors), different content for each seed."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.basename", basename)
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_file_type(0)
    rng = np.random.default_rng(seed)
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 32)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def sha(data: bytes) -> str:
    """Hex SHA-256."""
    return hashlib.sha256(data).hexdigest()


class CountingReader(io.BytesIO):
    """A source that counts how many bytes the store pulled out of it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def readinto(self, b: Any) -> int:
        n = super().readinto(b)
        self.bytes_read += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        out = super().read(size)
        self.bytes_read += len(out)
        return out


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    """An empty store with its directories created."""
    s = ModelStore(tmp_path / "state")
    s.ensure()
    return s


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A small valid GGUF file."""
    return make_gguf(tmp_path / "tiny.Q0.gguf")


def store_files(s: ModelStore) -> dict[str, tuple[int, int]]:
    """blobs/ and staging/ (and the catalog), names and sizes: what a failed operation must not change."""
    return snapshot_tree(s.root)


# -- ingest -----------------------------------------------------------------------------------

PAYLOAD = os.urandom(3 * (1 << 20) + 12345)  # more than one copy chunk


def test_ingest_with_matching_digest_and_size(store: ModelStore) -> None:
    digest, size = store.ingest(io.BytesIO(PAYLOAD), expected_digest=sha(PAYLOAD), expected_size=len(PAYLOAD))
    assert (digest, size) == (sha(PAYLOAD), len(PAYLOAD))
    assert store.blob_path(digest).read_bytes() == PAYLOAD
    assert store.has_blob(digest)
    assert list(store.staging_dir.iterdir()) == []


def test_ingest_accepts_prefixed_digest(store: ModelStore) -> None:
    digest, _ = store.ingest(io.BytesIO(b"abc"), expected_digest="sha256:" + sha(b"abc"))
    assert digest == sha(b"abc")
    assert store.ingest(io.BytesIO(b"abc"), expected_digest="sha256-" + sha(b"abc"))[0] == digest


def test_ingest_without_expectations(store: ModelStore) -> None:
    assert store.ingest(io.BytesIO(PAYLOAD)) == (sha(PAYLOAD), len(PAYLOAD))


def test_ingest_hash_mismatch_changes_nothing(store: ModelStore) -> None:
    before = store_files(store)
    wrong = sha(b"something else")
    with pytest.raises(StoreError) as ei:
        store.ingest(io.BytesIO(PAYLOAD), expected_digest=wrong, expected_size=len(PAYLOAD))
    assert "hash mismatch" in ei.value.message and wrong in ei.value.message and sha(PAYLOAD) in ei.value.message
    assert store_files(store) == before
    assert list(store.blobs_dir.iterdir()) == [] and list(store.staging_dir.iterdir()) == []


def test_ingest_longer_source_stops_at_size_plus_one(store: ModelStore) -> None:
    before = store_files(store)
    size = len(PAYLOAD) - (5 << 20) // 2  # the source is ~2.5 MiB longer than announced
    src = CountingReader(PAYLOAD)
    with pytest.raises(StoreError, match=f"size mismatch: expected {size} bytes, got more"):
        store.ingest(src, expected_digest=sha(PAYLOAD[:size]), expected_size=size)
    assert src.bytes_read == size + 1
    assert store_files(store) == before


def test_ingest_one_byte_longer(store: ModelStore) -> None:
    before = store_files(store)
    data = PAYLOAD[:1000]
    src = CountingReader(data + b"!")
    with pytest.raises(StoreError, match="expected 1000 bytes, got more"):
        store.ingest(src, expected_digest=sha(data), expected_size=1000)
    assert src.bytes_read == 1001
    assert store_files(store) == before


def test_ingest_shorter_source(store: ModelStore) -> None:
    before = store_files(store)
    with pytest.raises(StoreError, match=f"expected {len(PAYLOAD) + 1} bytes, got {len(PAYLOAD)}"):
        store.ingest(io.BytesIO(PAYLOAD), expected_size=len(PAYLOAD) + 1)
    assert store_files(store) == before


def test_ingest_failing_source_leaves_no_partial_copy(store: ModelStore) -> None:
    class Broken(io.BytesIO):
        def readinto(self, b: Any) -> int:
            if self.tell() > 0:
                raise OSError(5, "Input/output error")
            return super().readinto(b)

    before = store_files(store)
    with pytest.raises(OSError, match="Input/output"):
        store.ingest(Broken(PAYLOAD))
    assert store_files(store) == before


def test_ingest_bad_expected_digest_is_refused(store: ModelStore) -> None:
    with pytest.raises(StoreError, match="not a sha256 digest"):
        store.ingest(io.BytesIO(b"x"), expected_digest="../../etc/passwd")
    assert list(store.blobs_dir.iterdir()) == [] and list(store.staging_dir.iterdir()) == []


# -- digests and family names -----------------------------------------------------------------

GOOD = sha(b"x")


@pytest.mark.parametrize("bad", [
    GOOD.upper(), GOOD[:-1] + "A", GOOD[:-1] + "g", GOOD[:-1] + " ", "z" * 64, "../" + GOOD[3:],
    "../../" + GOOD, GOOD + "/..", GOOD[:-1], GOOD + "0", "", "sha256-", "sha256:" + GOOD[:10],
    "sha512-" + GOOD, GOOD + "\n",
], ids=["upper", "one upper", "non-hex g", "space", "all z", "dotdot", "dotdot prefix", "dotdot suffix",
        "63 chars", "65 chars", "empty", "prefix only", "prefix short", "sha512", "newline"])
def test_validate_digest_rejects(bad: str, store: ModelStore) -> None:
    with pytest.raises(StoreError, match="not a sha256 digest"):
        validate_digest(bad)
    with pytest.raises(StoreError):
        store.blob_path(bad)


def test_validate_digest_accepts_and_strips_prefix() -> None:
    assert validate_digest(GOOD) == GOOD
    assert validate_digest("sha256-" + GOOD) == GOOD
    assert validate_digest("sha256:" + GOOD) == GOOD


@pytest.mark.parametrize("name", ["smollm2", "a", "0", "gemma-3-270m", "x.y_z-1", "a" * 64])
def test_validate_family_accepts(name: str) -> None:
    assert validate_family(name) == name


@pytest.mark.parametrize("name", ["", "Upper", "-lead", ".hidden", "_x", "a/b", "../x", "a b", "a" * 65,
                                  "café", "x\n"])
def test_validate_family_rejects(name: str) -> None:
    with pytest.raises(StoreError, match="bad family name"):
        validate_family(name)


# -- add_file and the catalog -----------------------------------------------------------------


def test_add_file_defaults_from_header(store: ModelStore, tiny: Path) -> None:
    v = store.add_file(tiny)
    assert v.family == "tiny" and v.task == "generate" and v.source_name == tiny.name
    assert v.digest == sha(tiny.read_bytes()) and v.size == tiny.stat().st_size
    assert v.info is not None and v.info.n_layers == 2 and v.quantization == "F32"
    cat = json.loads(store.catalog_path.read_text())
    assert cat["families"]["tiny"]["task"] == "generate"
    assert [x["digest"] for x in cat["families"]["tiny"]["variants"]] == [v.digest]


def test_add_same_file_twice_dedupes(store: ModelStore, tiny: Path) -> None:
    v1 = store.add_file(tiny, family="tiny")
    catalog = store.catalog_path.read_bytes()
    v2 = store.add_file(tiny, family="tiny")
    assert (v2.family, v2.digest, v2.size, v2.added) == (v1.family, v1.digest, v1.size, v1.added)
    assert store.catalog_path.read_bytes() == catalog
    assert [p.name for p in store.blobs_dir.iterdir()] == [f"sha256-{v1.digest}"]
    assert list(store.staging_dir.iterdir()) == []
    # a copy of the same bytes under another name is the same blob too
    copy = tiny.with_name("renamed.gguf")
    shutil.copyfile(tiny, copy)
    assert store.add_file(copy, family="tiny").digest == v1.digest
    assert len(store.families()["tiny"]) == 1


def test_two_families_share_a_blob(store: ModelStore, tiny: Path) -> None:
    a = store.add_file(tiny, family="alpha")
    b = store.add_file(tiny, family="beta")
    assert a.digest == b.digest
    assert len(list(store.blobs_dir.iterdir())) == 1
    fams = store.families()
    assert sorted(fams) == ["alpha", "beta"]
    assert [v.digest for v in fams["alpha"]] == [v.digest for v in fams["beta"]] == [a.digest]
    assert all(v.broken is None for vs in fams.values() for v in vs)


def test_two_variants_in_one_family(store: ModelStore, tmp_path: Path) -> None:
    one = store.add_file(make_gguf(tmp_path / "a.gguf", seed=1), family="tiny")
    two = store.add_file(make_gguf(tmp_path / "b.gguf", seed=2), family="tiny")
    assert one.digest != two.digest
    assert [v.digest for v in store.families()["tiny"]] == [one.digest, two.digest]


def test_add_file_bad_family_changes_nothing(store: ModelStore, tiny: Path) -> None:
    before = store_files(store)
    with pytest.raises(StoreError, match="bad family name"):
        store.add_file(tiny, family="../escape")
    assert store_files(store) == before


def test_add_file_unknown_task(store: ModelStore, tiny: Path) -> None:
    before = store_files(store)
    with pytest.raises(StoreError, match="unknown task 'chat'"):
        store.add_file(tiny, task="chat")
    assert store_files(store) == before


def test_add_file_not_gguf(store: ModelStore, tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(100))
    before = store_files(store)
    with pytest.raises(StoreError, match="not a GGUF file") as ei:
        store.add_file(junk)
    assert str(junk) in ei.value.message
    assert store_files(store) == before


def test_task_mismatch_for_existing_family(store: ModelStore, tiny: Path) -> None:
    store.add_file(tiny, family="tiny")
    catalog = store.catalog_path.read_bytes()
    with pytest.raises(StoreError, match="family 'tiny' serves task 'generate', not 'embed'"):
        store.add_file(tiny, family="tiny", task="embed")
    assert store.catalog_path.read_bytes() == catalog


def test_task_mismatch_leaves_no_orphan_blob(store: ModelStore, tmp_path: Path) -> None:
    store.add_file(make_gguf(tmp_path / "a.gguf", seed=1), family="tiny")
    before = store_files(store)
    with pytest.raises(StoreError, match="serves task"):
        store.add_file(make_gguf(tmp_path / "b.gguf", seed=2), family="tiny", task="embed")
    assert store_files(store) == before


# -- inspection -------------------------------------------------------------------------------


@pytest.fixture
def added(store: ModelStore, tiny: Path) -> Variant:
    """`tiny` added to the store as family 'tiny'."""
    return store.add_file(tiny, family="tiny")


def _only(store: ModelStore) -> Variant:
    [v] = store.families()["tiny"]
    return v


def test_inspect_healthy(store: ModelStore, added: Variant) -> None:
    v = _only(store)
    assert v.broken is None and v.info is not None
    assert v.to_json()["gguf"]["layers"] == 2


def test_inspect_missing_blob(store: ModelStore, added: Variant) -> None:
    store.blob_path(added.digest).unlink()
    v = _only(store)
    assert v.broken == "blob missing from the store"
    assert v.info is None and v.quantization == "unknown"


def test_inspect_size_mismatch(store: ModelStore, added: Variant) -> None:
    with store.blob_path(added.digest).open("ab") as f:
        f.write(b"\0")
    v = _only(store)
    assert v.broken == f"blob is {added.size + 1} bytes, catalog says {added.size}"


def test_inspect_not_gguf(store: ModelStore, added: Variant) -> None:
    store.blob_path(added.digest).write_bytes(b"\0" * added.size)
    v = _only(store)
    assert v.broken is not None and "not a GGUF file" in v.broken


def test_inspect_truncated(store: ModelStore, added: Variant) -> None:
    blob = store.blob_path(added.digest)
    cut = added.size - 64
    blob.write_bytes(blob.read_bytes()[:cut])
    cat = json.loads(store.catalog_path.read_text())
    cat["families"]["tiny"]["variants"][0]["size"] = cut  # so the size check passes and the header is read
    store.catalog_path.write_text(json.dumps(cat))
    v = _only(store)
    assert v.broken is not None and v.broken.startswith("truncated: tensor data needs")


def test_one_broken_variant_does_not_hide_the_others(store: ModelStore, tmp_path: Path) -> None:
    ok = store.add_file(make_gguf(tmp_path / "a.gguf", seed=1), family="ok")
    gone = store.add_file(make_gguf(tmp_path / "b.gguf", seed=2), family="gone")
    store.blob_path(gone.digest).unlink()
    fams = store.families()
    assert fams["ok"][0].broken is None and fams["ok"][0].digest == ok.digest
    assert fams["gone"][0].broken == "blob missing from the store"


# -- the catalog file -------------------------------------------------------------------------


def test_no_catalog_is_an_empty_store(store: ModelStore) -> None:
    assert store.families() == {}


@pytest.mark.parametrize(("content", "expect"), [
    ("{not json", "is unreadable"),
    ("[]", "has no 'families' object"),
    ('{"families": []}', "has no 'families' object"),
    ('{"version": 1}', "has no 'families' object"),
    ("", "is unreadable"),
])
def test_bad_catalog(store: ModelStore, content: str, expect: str) -> None:
    store.catalog_path.write_text(content)
    with pytest.raises(StoreError, match=expect) as ei:
        store.families()
    assert str(store.catalog_path) in ei.value.message


def test_unreadable_catalog(store: ModelStore, tiny: Path) -> None:
    store.catalog_path.mkdir()  # root reads a mode-000 file; nobody reads a directory as text
    with pytest.raises(StoreError, match="is unreadable"):
        store.families()
    with pytest.raises(StoreError, match="is unreadable"):
        store.add_file(tiny)
