"""Read what a GGUF file's header says without loading its weights.

The reader parses the key/value metadata and the tensor directory, then checks that
the file is long enough to hold every tensor the directory lists, so a truncated
download is caught here rather than by a crash inside llama.cpp. Large arrays (the
tokenizer vocabulary) are skipped over and only their length is kept.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
#: Arrays longer than this are not kept in the metadata dict, only their length.
MAX_KEPT_ARRAY = 64
#: A header claiming more entries than this is not a real model.
MAX_ENTRIES = 1_000_000
MAX_STRING = 64 * 1024 * 1024
MAX_ARRAY_NESTING = 8

# ggml tensor type -> (elements per block, bytes per block)
GGML_TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
}

# llama.cpp's LLAMA_FTYPE_* values, as written to general.file_type
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE",
}

# Architectures that produce embeddings rather than text.
EMBEDDING_ARCHITECTURES = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "t5encoder"})

_SCALARS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """The file is not a readable GGUF model; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor directory."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def n_elements(self) -> int:
        """Number of elements in the tensor."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_bytes(self) -> int:
        """Bytes the tensor occupies in the file."""
        block, size = GGML_TYPE_SIZES[self.ggml_type]
        return self.n_elements // block * size


@dataclass(frozen=True)
class GGUFInfo:
    """The facts a GGUF header gives about a model."""

    path: str
    file_size: int
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...] = field(repr=False)
    data_offset: int

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata value for `key`, or `default`."""
        return self.metadata.get(key, default)

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        """Architecture-scoped metadata value, e.g. arch_key('context_length')."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    @property
    def architecture(self) -> str:
        """general.architecture, e.g. 'llama'."""
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def name(self) -> str | None:
        """general.name if the file has one."""
        v = self.metadata.get("general.name")
        return str(v) if v is not None else None

    @property
    def quantization(self) -> str:
        """Quantization type from general.file_type, or the dominant tensor type."""
        ft = self.metadata.get("general.file_type")
        if isinstance(ft, int) and ft in FILE_TYPES:
            return FILE_TYPES[ft]
        return "unknown"

    @property
    def parameter_count(self) -> int:
        """Total number of weights over all tensors."""
        return sum(t.n_elements for t in self.tensors)

    @property
    def weights_bytes(self) -> int:
        """Bytes of tensor data."""
        return sum(t.n_bytes for t in self.tensors)

    @property
    def n_layers(self) -> int | None:
        """Transformer block count."""
        v = self.arch_key("block_count")
        return int(v) if v is not None else None

    @property
    def context_length(self) -> int | None:
        """Context length the model was trained for."""
        v = self.arch_key("context_length")
        return int(v) if v is not None else None

    @property
    def has_chat_template(self) -> bool:
        """Whether tokenizer.chat_template is present."""
        return bool(self.metadata.get("tokenizer.chat_template"))

    @property
    def is_embedding_model(self) -> bool:
        """Whether the model is an encoder that produces embeddings rather than text."""
        return self.architecture in EMBEDDING_ARCHITECTURES or self.arch_key("pooling_type") is not None

    def summary(self) -> dict[str, Any]:
        """The catalog facts as plain JSON-able values."""
        return {
            "architecture": self.architecture,
            "name": self.name,
            "parameters": self.parameter_count,
            "quantization": self.quantization,
            "layers": self.n_layers,
            "context_length": self.context_length,
            "chat_template": self.has_chat_template,
            "embedding": self.is_embedding_model,
            "weights_bytes": self.weights_bytes,
            "file_size": self.file_size,
        }


class _Reader:
    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f = f
        self.size = size

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise GGUFError(f"truncated header: wanted {n} bytes at offset {self.f.tell() - len(b)}, "
                            f"file is {self.size} bytes")
        return b

    def skip(self, n: int) -> None:
        pos = self.f.tell() + n
        if pos > self.size:
            raise GGUFError(f"truncated header: needs {pos} bytes, file is {self.size} bytes")
        self.f.seek(pos)

    def scalar(self, vtype: int) -> Any:
        fmt = _SCALARS[vtype]
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def u32(self) -> int:
        return int(self.scalar(4))

    def u64(self) -> int:
        return int(self.scalar(10))

    def string(self) -> str:
        n = self.u64()
        if n > MAX_STRING:
            raise GGUFError(f"string of {n} bytes in header is not plausible")
        raw = self.read(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"header string is not UTF-8 at offset {self.f.tell() - n}") from e

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(vtype)
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise GGUFError(f"arrays nested deeper than {MAX_ARRAY_NESTING} levels")
            etype = self.u32()
            count = self.u64()
            if count > self.size:
                raise GGUFError(f"array of {count} elements cannot fit in a {self.size}-byte file")
            if count > MAX_KEPT_ARRAY:
                self._skip_array(etype, count, depth + 1)
                return _SkippedArray(count)
            return [self.value(etype, depth + 1) for _ in range(count)]
        raise GGUFError(f"unknown metadata value type {vtype}")

    def _skip_array(self, etype: int, count: int, depth: int) -> None:
        if etype in _SCALARS:
            self.skip(struct.calcsize(_SCALARS[etype]) * count)
        elif etype == _STRING:
            for _ in range(count):
                self.skip(self.u64())
        else:
            for _ in range(count):
                self.value(etype, depth)


class _SkippedArray(list[Any]):
    """Stands in for a long array that was not read; remembers its length."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.length = length

    def __repr__(self) -> str:
        return f"<array of {self.length}>"


def read_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Parse the header of the GGUF file at `path`; raise GGUFError saying what is wrong."""
    p = Path(path)
    try:
        size = p.stat().st_size
        f = p.open("rb")
    except OSError as e:
        raise GGUFError(f"cannot open {p}: {e.strerror}") from e
    with f:
        r = _Reader(f, size)
        if size < 24:
            raise GGUFError(f"file is {size} bytes, too short to be a GGUF model")
        magic = r.read(4)
        if magic != GGUF_MAGIC:
            raise GGUFError(f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        version = r.u32()
        if version not in (2, 3):
            raise GGUFError(f"unsupported GGUF version {version}")
        n_tensors = r.u64()
        n_kv = r.u64()
        if n_tensors > MAX_ENTRIES or n_kv > MAX_ENTRIES:
            raise GGUFError(f"implausible header: {n_tensors} tensors, {n_kv} metadata keys")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.u32())
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.u32()
            if n_dims > 8:
                raise GGUFError(f"tensor {name!r} claims {n_dims} dimensions")
            shape = tuple(r.u64() for _ in range(n_dims))
            ggml_type = r.u32()
            if ggml_type not in GGML_TYPE_SIZES:
                raise GGUFError(f"tensor {name!r} has unknown type {ggml_type}")
            tensors.append(TensorInfo(name, shape, ggml_type, r.u64()))
        align = metadata.get("general.alignment", DEFAULT_ALIGNMENT) or DEFAULT_ALIGNMENT
        if not isinstance(align, int) or isinstance(align, bool) or align < 1 or align & (align - 1):
            raise GGUFError(f"general.alignment must be a power-of-two integer, not {align!r}")
        pos = f.tell()
        data_offset = (pos + align - 1) // align * align
    info = GGUFInfo(str(p), size, version, metadata, tuple(tensors), data_offset)
    needed = data_offset + max((t.offset + t.n_bytes for t in info.tensors), default=0)
    if needed > size:
        raise GGUFError(f"truncated: tensor data needs {needed} bytes, file has {size}")
    return info
