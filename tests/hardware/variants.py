"""Build other quantizations of a real GGUF header in code (for the choice logic only)."""

from __future__ import annotations

import dataclasses

from hardware.gguf import FILE_TYPES, GGUFInfo

#: file type name -> ggml tensor type used for the quantized (2-D) weights
_TENSOR_TYPE = {"F32": 0, "F16": 1, "Q8_0": 8, "Q6_K": 14, "Q4_1": 3, "Q4_0": 2, "Q2_K": 10, "IQ1_S": 19}


def requantized(info: GGUFInfo, file_type: str) -> GGUFInfo:
    """`info` as if quantized to `file_type`: every 2-D weight re-typed, 1-D norms kept in F32."""
    ftype = next(k for k, v in FILE_TYPES.items() if v == file_type)
    ggml_type = _TENSOR_TYPE[file_type]
    tensors = tuple(dataclasses.replace(t, ggml_type=ggml_type) if len(t.shape) >= 2 else t
                    for t in info.tensors)
    metadata = {**info.metadata, "general.file_type": ftype}
    return dataclasses.replace(info, path=f"{info.path}#{file_type}", metadata=metadata, tensors=tensors)
