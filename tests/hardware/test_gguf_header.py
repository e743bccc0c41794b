"""hardware/gguf.py read_gguf: the real model headers, cross-checked with the `gguf` package; bad files."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import pytest

from hardware.gguf import GGUFError, GGUFInfo, read_gguf


@pytest.fixture(scope="module")
def smol(smollm2_path: Path) -> GGUFInfo:
    """SmolLM2's parsed header."""
    return read_gguf(smollm2_path)


@pytest.fixture(scope="module")
def header(smollm2_path: Path, smol: GGUFInfo) -> bytes:
    """SmolLM2's header bytes: everything before the tensor data."""
    with smollm2_path.open("rb") as f:
        return f.read(smol.data_offset)


def _write(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _error(path: Path) -> str:
    with pytest.raises(GGUFError) as ei:
        read_gguf(path)
    return str(ei.value)


# -- the real files ---------------------------------------------------------------------------


def test_smollm2_facts(smol: GGUFInfo, smollm2_path: Path) -> None:
    assert smol.version == 3
    assert smol.architecture == "llama"
    assert smol.n_layers == 30
    assert smol.quantization == "Q4_1"
    assert smol.context_length == 8192
    assert smol.has_chat_template
    assert not smol.is_embedding_model
    assert smol.file_size == smollm2_path.stat().st_size
    assert smol.data_offset % 32 == 0
    assert 130e6 < smol.parameter_count < 140e6
    # the vocabulary is skipped, only its length kept
    tokens = smol.get("tokenizer.ggml.tokens")
    assert tokens == [] and tokens.length == 49152


def test_gemma_facts(gemma_path: Path) -> None:
    g = read_gguf(gemma_path)
    assert g.architecture == "gemma3"
    assert g.n_layers == 18
    assert g.quantization == "Q4_K_M"
    assert g.context_length == 32768
    assert not g.has_chat_template
    assert not g.is_embedding_model
    assert 260e6 < g.parameter_count < 280e6
    s = g.summary()
    assert (s["architecture"], s["layers"], s["quantization"], s["chat_template"]) == ("gemma3", 18, "Q4_K_M", False)


@pytest.mark.parametrize("which", ["smollm2_path", "gemma_path"])
def test_agrees_with_gguf_package(which: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(which)
    ours = read_gguf(path)
    ref = gguf.GGUFReader(str(path))
    assert ours.parameter_count == sum(int(t.n_elements) for t in ref.tensors)
    assert ours.weights_bytes == sum(int(t.n_bytes) for t in ref.tensors)
    assert ours.data_offset == ref.data_offset
    assert len(ours.tensors) == len(ref.tensors)
    by_name = {t.name: t for t in ref.tensors}
    for t in ours.tensors:
        r = by_name[t.name]
        assert t.ggml_type == int(r.tensor_type), t.name
        assert t.n_bytes == int(r.n_bytes), t.name
        assert t.offset == int(r.data_offset) - ref.data_offset, t.name
    for key in ("general.architecture", "general.file_type", "general.name"):
        field = ref.fields.get(key)
        if field is not None:
            assert ours.get(key) == field.contents(), key


# -- bad files, built from the real header bytes ----------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, b""))
    assert "0 bytes" in msg and "too short" in msg


def test_missing_file(tmp_path: Path) -> None:
    msg = _error(tmp_path / "nope.gguf")
    assert "cannot open" in msg and "No such file" in msg


def test_wrong_magic(tmp_path: Path, header: bytes) -> None:
    msg = _error(_write(tmp_path, b"GGML" + header[4:]))
    assert "not a GGUF file" in msg and "b'GGML'" in msg


def test_text_file(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n"))
    assert "not a GGUF file" in msg


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_unsupported_version(tmp_path: Path, header: bytes, version: int) -> None:
    msg = _error(_write(tmp_path, header[:4] + struct.pack("<I", version) + header[8:]))
    assert f"unsupported GGUF version {version}" in msg


@pytest.mark.parametrize(("cut", "expect"), [
    (30, "truncated header: wanted 8 bytes at offset 24, file is {cut} bytes"),  # in the first key's length
    (40, "truncated header: wanted {n} bytes at offset 32, file is {cut} bytes"),  # in the first key
    (200, "truncated header: wanted"),
    # the vocabulary's length is checked against the file size before it is skipped
    (4096, "array of 49152 elements cannot fit in a {cut}-byte file"),
    (200_000, "truncated header: needs"),
], ids=["in first key length", "in first key", "in early values", "before the vocabulary", "in the vocabulary"])
def test_truncated_in_metadata(tmp_path: Path, header: bytes, cut: int, expect: str) -> None:
    (key_len,) = struct.unpack_from("<Q", header, 24)
    msg = _error(_write(tmp_path, header[:cut]))
    assert expect.format(n=key_len, cut=cut) in msg
    assert str(cut) in msg


def test_truncated_in_tensor_directory(tmp_path: Path, header: bytes) -> None:
    msg = _error(_write(tmp_path, header[: len(header) - 100]))
    assert "truncated header" in msg


def test_truncated_in_tensor_data(tmp_path: Path, smollm2_path: Path, smol: GGUFInfo) -> None:
    with smollm2_path.open("rb") as f:
        data = f.read(smol.data_offset + 1_000_000)
    msg = _error(_write(tmp_path, data))
    assert f"tensor data needs {smol.data_offset + smol.weights_bytes}" in msg
    assert f"file has {len(data)}" in msg


def test_header_only(tmp_path: Path, header: bytes) -> None:
    assert "truncated: tensor data needs" in _error(_write(tmp_path, header))


def test_one_byte_short(tmp_path: Path, smollm2_path: Path) -> None:
    data = smollm2_path.read_bytes()[:-1]
    assert "truncated: tensor data needs" in _error(_write(tmp_path, data))


@pytest.mark.parametrize(("n_tensors", "n_kv"), [(2**40, 37), (272, 2**40), (2**64 - 1, 2**64 - 1),
                                                 (1_000_001, 0)])
def test_implausible_counts(tmp_path: Path, header: bytes, n_tensors: int, n_kv: int) -> None:
    bad = header[:8] + struct.pack("<QQ", n_tensors, n_kv) + header[24:]
    msg = _error(_write(tmp_path, bad))
    assert "implausible header" in msg and str(n_tensors) in msg


def test_implausible_string_length(tmp_path: Path, header: bytes) -> None:
    bad = header[:24] + struct.pack("<Q", 2**62) + header[32:]
    assert "not plausible" in _error(_write(tmp_path, bad))


def test_non_utf8_key(tmp_path: Path, header: bytes) -> None:
    (key_len,) = struct.unpack_from("<Q", header, 24)
    first_key = header[32:32 + key_len]
    assert first_key.startswith(b"general.")
    bad = header[:32] + b"\xff\xfe" + first_key[2:] + header[32 + key_len:]
    msg = _error(_write(tmp_path, bad))
    assert "not UTF-8" in msg and "offset 32" in msg


def test_unknown_value_type(tmp_path: Path, header: bytes) -> None:
    (key_len,) = struct.unpack_from("<Q", header, 24)
    type_at = 32 + key_len
    bad = header[:type_at] + struct.pack("<I", 99) + header[type_at + 4:]
    assert "unknown metadata value type 99" in _error(_write(tmp_path, bad))


def _tiny_gguf(path: Path, **kv: object) -> Path:
    """A small complete GGUF file made with the gguf package, extra metadata added as given."""
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in kv.items():
        if isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_uint32(k, int(v))  # type: ignore[call-overload]
    w.add_tensor("t", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_file_made_by_the_gguf_package(tmp_path: Path) -> None:
    info = read_gguf(_tiny_gguf(tmp_path / "t.gguf"))
    assert info.architecture == "llama" and info.parameter_count == 32 and info.weights_bytes == 128
    assert info.quantization == "unknown"  # no general.file_type


def test_non_numeric_alignment(tmp_path: Path) -> None:
    path = _tiny_gguf(tmp_path / "t.gguf", **{"general.alignment": "wide"})
    with pytest.raises(GGUFError):
        read_gguf(path)


def test_deeply_nested_arrays_are_refused_cleanly(tmp_path) -> None:
    import struct as st

    from hardware.gguf import GGUFError, read_gguf

    body = st.pack("<Q", 3) + b"key" + st.pack("<I", 9)  # key "key", type ARRAY
    body += (st.pack("<I", 9) + st.pack("<Q", 1)) * 5000  # array of array of ... 5000 deep
    data = b"GGUF" + st.pack("<IQQ", 3, 0, 1) + body + b"\0" * 64
    p = tmp_path / "nested.gguf"
    p.write_bytes(data)
    with pytest.raises(GGUFError, match="nested deeper"):
        read_gguf(p)
