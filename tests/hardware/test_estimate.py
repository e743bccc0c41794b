from __future__ import annotations

import dataclasses

import pytest

from hardware.estimate import estimate_memory, kv_bytes_per_token, model_shape
from hardware.gguf import GGUFInfo

MiB = 1 << 20

# RSS growth measured here with bench/memory_estimate.py (llama-cpp-python 0.3.36, n_threads=2):
# (model fixture, n_ctx, after load, with the context filled), MiB.
MEASURED = [
    ("smollm2", 512, 124.2, 146.3), ("smollm2", 2048, 158.9, 224.1), ("smollm2", 8192, 294.0, 531.5),
    ("gemma3", 512, 303.8, 329.4), ("gemma3", 2048, 331.9, 377.5), ("gemma3", 8192, 440.2, 589.4),
]


def test_shape_from_real_headers(smollm2: GGUFInfo, gemma3: GGUFInfo) -> None:
    s = model_shape(smollm2)
    assert (s.n_layers, s.n_head_kv[0], s.key_length, s.value_length, s.n_vocab) == (30, 3, 64, 64, 49152)
    assert not any(s.swa_layers)
    g = model_shape(gemma3)
    assert (g.n_layers, g.n_head_kv[0], g.key_length, g.sliding_window, g.n_vocab) == (
        18, 1, 256, 512, 262144)
    # llama.cpp's gemma3 rule: every 6th layer (il % 6 == 5) is global, the rest slide
    assert [il for il, swa in enumerate(g.swa_layers) if not swa] == [5, 11, 17]


def test_kv_cache_matches_llama_cpp(smollm2: GGUFInfo, gemma3: GGUFInfo) -> None:
    # llama.cpp prints "size = 11.25 MiB (512 cells, 30 layers)", and 22.50 MiB for n_ctx 1000
    # (padded to 1024 cells)
    assert kv_bytes_per_token(smollm2) == 30 * 3 * 64 * 2 * 2
    assert estimate_memory(smollm2, 512).kv_bytes == 11.25 * MiB
    e = estimate_memory(smollm2, 1000)
    assert e.kv_cells == 1024 and e.kv_bytes == 22.5 * MiB
    # gemma3 at 2048: 6.00 MiB non-SWA (3 layers) + 30.00 MiB SWA with llama-cpp-python's swa_full=True,
    # or 15.00 MiB SWA (1024 cells = pad(512 + 512, 256)) with swa_full=False
    assert estimate_memory(gemma3, 2048).kv_bytes == 36 * MiB
    assert estimate_memory(gemma3, 2048, swa_full=False).kv_bytes == 21 * MiB
    assert estimate_memory(gemma3, 512, swa_full=False).kv_bytes == 9 * MiB  # window never exceeds n_ctx


def test_quantized_kv_cache_is_smaller(smollm2: GGUFInfo) -> None:
    f16 = estimate_memory(smollm2, 4096).kv_bytes
    q8 = estimate_memory(smollm2, 4096, type_k="q8_0", type_v="q8_0").kv_bytes
    assert q8 == f16 * 34 // 64
    with pytest.raises(ValueError, match="unknown cache type"):
        estimate_memory(smollm2, 4096, type_k="q3")


@pytest.mark.parametrize(("model", "n_ctx", "load_mib", "peak_mib"), MEASURED)
def test_estimate_within_15_percent_of_measured(request: pytest.FixtureRequest, model: str, n_ctx: int,
                                                load_mib: float, peak_mib: float) -> None:
    est = estimate_memory(request.getfixturevalue(model), n_ctx)
    assert est.loaded_bytes / MiB == pytest.approx(load_mib, rel=0.15)
    assert est.total_bytes / MiB == pytest.approx(peak_mib, rel=0.15)


def test_compute_grows_with_context_and_shrinks_with_flash_attention(smollm2: GGUFInfo) -> None:
    c = [estimate_memory(smollm2, n).compute_bytes for n in (512, 2048, 8192)]
    assert c[0] < c[1] < c[2]
    assert estimate_memory(smollm2, 8192, flash_attn=True).compute_bytes < c[2] / 4
    assert estimate_memory(smollm2, 8192, n_ubatch=128).compute_bytes < c[2] / 3


def test_cpu_repack_counts_q4_k_twice(gemma3: GGUFInfo) -> None:
    e = estimate_memory(gemma3, 512)
    q4k = sum(t.n_bytes for t in gemma3.tensors if t.ggml_type == 12)
    assert e.repacked_bytes == q4k
    assert estimate_memory(gemma3, 512, cpu_repack=False).repacked_bytes == 0


def test_per_device_split(smollm2: GGUFInfo) -> None:
    cpu_only = estimate_memory(smollm2, 2048)
    assert [d.device for d in cpu_only.devices] == ["cpu"] and cpu_only.devices[0].layers == 30

    part = estimate_memory(smollm2, 2048, n_gpu_layers=10)
    cpu, gpu = part.device("cpu"), part.device("gpu0")
    assert (cpu.layers, gpu.layers) == (20, 10)
    assert gpu.kv_bytes == 10 * 2048 * kv_bytes_per_token(smollm2) // 30
    assert cpu.weights_bytes + gpu.weights_bytes == smollm2.weights_bytes  # Q4_1 is not repacked

    full = estimate_memory(smollm2, 2048, n_gpu_layers=99)
    assert full.device("gpu0").layers == 30 and full.device("cpu").kv_bytes == 0
    embd = next(t.n_bytes for t in smollm2.tensors if t.name == "token_embd.weight")
    # tied embeddings: the output layer on the GPU gets its own copy; token_embd stays on the host
    assert full.device("cpu").weights_bytes == embd
    assert full.device("gpu0").weights_bytes == smollm2.weights_bytes

    two = estimate_memory(smollm2, 2048, n_gpu_layers=99, gpu_split=(3, 1))
    assert [d.layers for d in two.devices] == [0, 24, 6]


def test_header_without_shape_is_an_error(smollm2: GGUFInfo) -> None:
    md = {k: v for k, v in smollm2.metadata.items() if k != "llama.embedding_length"}
    with pytest.raises(ValueError, match="embedding_length"):
        estimate_memory(dataclasses.replace(smollm2, metadata=md), 512)
    with pytest.raises(ValueError, match="n_ctx"):
        estimate_memory(smollm2, 0)
