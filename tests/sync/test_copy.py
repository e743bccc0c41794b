"""The store's pipelined hashing copy (O_DIRECT where possible) at chunk and alignment boundaries."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from runtime.store import PIPE_CHUNK, ModelStore, StoreError


class Dribble(io.RawIOBase):
    """A source that returns at most 1000 bytes per read, like a slow device."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), 1000, len(self.data) - self.pos)
        b[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, PIPE_CHUNK - 1, PIPE_CHUNK, PIPE_CHUNK + 1,
                                  2 * PIPE_CHUNK + 4096 + 5])
def test_ingest_sizes(tmp_path: Path, size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    store = ModelStore(tmp_path)
    digest, n = store.ingest(io.BytesIO(data), expected_digest=hashlib.sha256(data).hexdigest(),
                             expected_size=size)
    assert n == size and store.blob_path(digest).read_bytes() == data
    assert list(store.staging_dir.iterdir()) == []


def test_ingest_short_reads(tmp_path: Path) -> None:
    data = b"x" * (PIPE_CHUNK + 12345)
    digest, _ = ModelStore(tmp_path).ingest(Dribble(data), expected_size=len(data))  # type: ignore[arg-type]
    assert digest == hashlib.sha256(data).hexdigest()


def test_ingest_stops_at_size_plus_one(tmp_path: Path) -> None:
    src = io.BytesIO(b"y" * (3 * PIPE_CHUNK))
    with pytest.raises(StoreError) as ei:
        ModelStore(tmp_path).ingest(src, expected_size=100)
    assert ei.value.code == "size_mismatch" and src.tell() == 101
    assert list((tmp_path / "blobs").iterdir()) == []
