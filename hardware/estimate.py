"""How much memory a GGUF model will take, from its header alone.

The estimate follows what llama.cpp (as vendored by llama-cpp-python 0.3.36) allocates:

* **Weights**: the tensor bytes in the file. They are mmapped, so on the CPU they show up as
  file-backed RSS (reclaimable page cache, but counted here in full). Tensors of the types the
  CPU backend *repacks* for faster matmuls (Q4_0, Q4_K, IQ4_NL in ``blk.*``) are also copied
  into anonymous memory, so they count twice on the CPU.
* **KV cache**: per layer, ``cells * n_head_kv * (key_length * bytes(type_k) + value_length *
  bytes(type_v))``. ``cells`` is n_ctx padded up to 256 (llama.cpp pads it). Sliding-window
  layers hold only ``pad(n_swa * n_seq + n_ubatch, 256)`` cells when ``swa_full`` is False;
  llama-cpp-python's default is ``swa_full=True`` (the full n_ctx on every layer), and so is
  ours. Which layers slide comes from llama.cpp's per-architecture rule (gemma3: every 6th
  layer, il % 6 == 5, is global; gemma2: every 2nd; cohere2 and llama4: every 4th), or from a
  ``sliding_window_pattern`` key in the header when present.
* **Compute buffers** (documented approximation, measured with ``bench/memory_estimate.py``):
  the worst case is a full ``n_ubatch`` prompt step with the context full. Without flash
  attention the CPU materialises ``KQ`` (f32, ``n_kv * n_ubatch * n_head``), an f16 copy of
  the softmax for the ``V·KQ`` matmul (in the CPU backend's work buffer) and the f32 mask
  (one per cache: two for models with sliding-window layers); with flash attention only an
  f16 mask. On top of that the per-token activations, ``n_ubatch * 4 B * (2 n_ff + 2 n_head
  * key_length + n_embd)``. llama.cpp *reserves* room for ``n_ubatch`` rows of logits as
  well (``n_vocab * n_ubatch * 4 B``), but llama-cpp-python asks for the last token's logits
  only, so on the CPU those pages are never touched and are not counted; on a GPU the
  reservation is real memory and is counted.
* **Fixed overhead**: tokenizer tables, the token-to-piece cache, the logits output buffer,
  library state: ``13.5 MiB + 129 B * n_vocab``, fitted on SmolLM2-135M (49k vocab) and
  gemma-3-270m (262k vocab). On a GPU add ``GPU_CONTEXT_BYTES`` per device for the CUDA
  context and cuBLAS workspace, an assumption not measured on this machine (no GPU here).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hardware.gguf import GGUFInfo

log = logging.getLogger(__name__)

MiB = 1 << 20
#: llama.cpp pads the context (KV cells) to a multiple of this.
CTX_PAD = 256
#: Fixed CPU-side overhead of a loaded model (see module docstring).
OVERHEAD_BASE_BYTES = int(13.5 * MiB)
OVERHEAD_PER_VOCAB_BYTES = 129
#: Per-GPU runtime overhead (CUDA context, cuBLAS workspace): an assumption, not measured here.
GPU_CONTEXT_BYTES = 300 * MiB
#: ggml types the CPU backend repacks into a second, anonymous copy (Q4_0, Q4_K, IQ4_NL).
CPU_REPACKED_TYPES = frozenset({2, 12, 20})

#: Bytes per element of a KV cache type (block types as block bytes / block elements).
CACHE_TYPE_BYTES: dict[str, float] = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
    "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32,
}

#: llama.cpp's sliding-window layer patterns: layer il slides when il % n < n - 1.
SWA_PATTERNS: dict[str, int] = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "cohere2": 4, "llama4": 4}


def _pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _per_layer(v: Any, n_layers: int, default: int) -> tuple[int, ...]:
    if v is None:
        return (default,) * n_layers
    if isinstance(v, list):
        if len(v) != n_layers:
            raise ValueError(f"per-layer value has {len(v)} entries for {n_layers} layers")
        return tuple(int(x) for x in v)
    return (int(v),) * n_layers


@dataclass(frozen=True)
class ModelShape:
    """The header facts the memory estimate needs."""

    architecture: str
    n_layers: int
    n_embd: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    key_length: int
    value_length: int
    n_ff: int
    n_vocab: int
    sliding_window: int | None
    swa_layers: tuple[bool, ...]


def model_shape(info: GGUFInfo) -> ModelShape:
    """Read the shape of the model from its GGUF header; raise ValueError if facts are missing."""
    n_layers = info.n_layers
    n_embd = info.arch_key("embedding_length")
    head = info.arch_key("attention.head_count")
    if not n_layers or not n_embd or head is None:
        raise ValueError(f"{info.path}: header lacks block_count/embedding_length/head_count")
    n_head = _per_layer(head, n_layers, 0)
    n_head_kv = _per_layer(info.arch_key("attention.head_count_kv"), n_layers, max(n_head))
    head_dim = int(n_embd) // max(max(n_head), 1)
    n_ff_raw = info.arch_key("feed_forward_length", 4 * int(n_embd))
    n_ff = max(n_ff_raw) if isinstance(n_ff_raw, list) else int(n_ff_raw)
    n_vocab = info.arch_key("vocab_size")
    if n_vocab is None:
        toks = info.get("tokenizer.ggml.tokens")
        n_vocab = getattr(toks, "length", None) or (len(toks) if toks else None)
    if n_vocab is None:
        embd = next((t for t in info.tensors if t.name == "token_embd.weight"), None)
        n_vocab = embd.shape[-1] if embd is not None else 0
    window = info.arch_key("attention.sliding_window")
    window = int(window) if window else None
    return ModelShape(
        architecture=info.architecture,
        n_layers=n_layers,
        n_embd=int(n_embd),
        n_head=n_head,
        n_head_kv=n_head_kv,
        key_length=int(info.arch_key("attention.key_length", head_dim)),
        value_length=int(info.arch_key("attention.value_length", head_dim)),
        n_ff=n_ff,
        n_vocab=int(n_vocab),
        sliding_window=window,
        swa_layers=_swa_layers(info, n_layers, window),
    )


def _swa_layers(info: GGUFInfo, n_layers: int, window: int | None) -> tuple[bool, ...]:
    if not window:
        return (False,) * n_layers
    pattern = info.arch_key("attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == n_layers:
        return tuple(bool(x) for x in pattern)
    n = int(pattern) if isinstance(pattern, int) else SWA_PATTERNS.get(info.architecture)
    if n is None:
        # Unknown architecture with a window: treat every layer as global (over-estimates, safely).
        log.debug("%s: no sliding-window rule for %s, counting all layers as global", info.path,
                  info.architecture)
        return (False,) * n_layers
    return tuple(n > 0 and il % n < n - 1 for il in range(n_layers))


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes one device needs for the model."""

    device: str
    weights_bytes: int = 0
    kv_bytes: int = 0
    compute_bytes: int = 0
    overhead_bytes: int = 0
    layers: int = 0

    @property
    def total_bytes(self) -> int:
        """Sum of all parts."""
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.overhead_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory a model needs at a given context, total and per device ('cpu', 'gpu0', ...)."""

    n_ctx: int
    kv_cells: int
    weights_bytes: int
    repacked_bytes: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int
    devices: tuple[DeviceMemory, ...] = field(default=())

    @property
    def total_bytes(self) -> int:
        """Worst-case total over all devices (full context, full prompt batch)."""
        return sum(d.total_bytes for d in self.devices)

    @property
    def loaded_bytes(self) -> int:
        """What the CPU holds right after loading, before any prompt: weights, KV, overhead."""
        return self.weights_bytes + self.repacked_bytes + self.kv_bytes + self.overhead_bytes

    def device(self, name: str) -> DeviceMemory:
        """The share of device `name` (an empty share if the device gets nothing)."""
        return next((d for d in self.devices if d.device == name), DeviceMemory(name))


def _layer_of(tensor_name: str) -> int | None:
    if tensor_name.startswith("blk."):
        part = tensor_name.split(".", 2)[1]
        if part.isdigit():
            return int(part)
    return None


def _layer_devices(n_layers: int, n_gpu_layers: int, gpu_split: Sequence[float]) -> list[str]:
    """Device of each block, then of the output layer (index n_layers), as llama.cpp assigns them.

    Blocks il >= n_layers - n_gpu_layers go to the GPUs; the output layer only when
    n_gpu_layers > n_layers. The offloaded range is cut between GPUs by cumulative split.
    """
    first = max(n_layers - max(n_gpu_layers, 0), 0)
    act = min(max(n_gpu_layers, 0), n_layers + 1)
    total = sum(gpu_split) or 1.0
    cum, acc = [], 0.0
    for s in gpu_split:
        acc += s / total
        cum.append(acc)
    out = []
    for il in range(n_layers + 1):
        on_gpu = il >= first and (il < n_layers or n_gpu_layers > n_layers) and act > 0
        if not on_gpu:
            out.append("cpu")
            continue
        frac = (il - first) / act
        gpu = next(i for i, c in enumerate(cum) if frac < c or i == len(cum) - 1)
        out.append(f"gpu{gpu}")
    return out


def estimate_memory(info: GGUFInfo, n_ctx: int, *, n_batch: int = 512, n_ubatch: int = 512,
                    type_k: str = "f16", type_v: str = "f16", n_gpu_layers: int = 0,
                    gpu_split: Sequence[float] = (1.0,), swa_full: bool = True, n_seq_max: int = 1,
                    flash_attn: bool = False, cpu_repack: bool = True) -> MemoryEstimate:
    """Estimate the memory of loading `info` with these llama.cpp context parameters.

    n_gpu_layers counts like llama.cpp's: the last N blocks, and the output layer when
    N > block count. Returns the parts and the per-device split.
    """
    if n_ctx <= 0:
        raise ValueError("n_ctx must be positive")
    if type_k not in CACHE_TYPE_BYTES or type_v not in CACHE_TYPE_BYTES:
        raise ValueError(f"unknown cache type; known: {', '.join(CACHE_TYPE_BYTES)}")
    shape = model_shape(info)
    cells = _pad(n_ctx, CTX_PAD)
    n_ub = max(1, min(n_ubatch, n_batch, n_ctx))
    swa_cells = cells
    if shape.sliding_window and not swa_full:
        swa_cells = min(cells, _pad(shape.sliding_window * n_seq_max + n_ub, CTX_PAD))
    bk, bv = CACHE_TYPE_BYTES[type_k], CACHE_TYPE_BYTES[type_v]

    devices = _layer_devices(shape.n_layers, n_gpu_layers, gpu_split)
    parts: dict[str, dict[str, int]] = {}

    def add(dev: str, key: str, n: int) -> None:
        parts.setdefault(dev, {"weights": 0, "kv": 0, "compute": 0, "overhead": 0, "layers": 0})[key] += n

    # Weights: blocks on their layer's device; token_embd stays on the CPU (get_rows on the host);
    # the output head (or the tied token_embd copy) goes with the output layer.
    has_output = any(t.name == "output.weight" for t in info.tensors)
    repacked = 0
    for t in info.tensors:
        il = _layer_of(t.name)
        if il is not None and il < shape.n_layers:
            dev = devices[il]
        elif t.name == "token_embd.weight":
            dev = "cpu"
            if not has_output and devices[-1] != "cpu":
                add(devices[-1], "weights", t.n_bytes)  # tied embeddings: llama.cpp duplicates it
        else:
            dev = devices[-1]
        add(dev, "weights", t.n_bytes)
        if dev == "cpu" and cpu_repack and il is not None and t.ggml_type in CPU_REPACKED_TYPES \
                and len(t.shape) == 2:
            repacked += t.n_bytes
            add("cpu", "weights", t.n_bytes)

    # KV cache, per layer.
    kv_total = 0
    for il in range(shape.n_layers):
        n_cells = swa_cells if shape.swa_layers[il] else cells
        per_cell = shape.n_head_kv[il] * (shape.key_length * bk + shape.value_length * bv)
        b = int(n_cells * per_cell)
        kv_total += b
        add(devices[il], "kv", b)
        add(devices[il], "layers", 1)

    # Compute buffers: attention scratch at a full context plus activations (see module docstring).
    n_kv = cells
    n_head = max(shape.n_head)
    n_masks = 2 if any(shape.swa_layers) and not all(shape.swa_layers) else 1
    # flash attention: only an f16 mask; otherwise KQ f32 + its f16 copy + f32 mask(s).
    attn = n_kv * n_ub * 2 * n_masks if flash_attn else n_kv * n_ub * (n_head * (4 + 2) + 4 * n_masks)
    act = n_ub * 4 * (2 * shape.n_ff + 2 * n_head * shape.key_length + shape.n_embd)
    compute_main = attn + act
    gpus = sorted({d for d in devices if d != "cpu"})
    if gpus:
        logits_reserved = shape.n_vocab * n_ub * 4 if devices[-1] != "cpu" else 0
        for g in gpus:
            add(g, "compute", compute_main + (logits_reserved if g == devices[-1] else 0))
            add(g, "overhead", GPU_CONTEXT_BYTES)
        # The host keeps a buffer for the layers it still runs and for the inputs.
        host_share = sum(1 for d in devices[:-1] if d == "cpu") / shape.n_layers
        add("cpu", "compute", int(act + attn * host_share))
    else:
        add("cpu", "compute", compute_main)
    overhead = OVERHEAD_BASE_BYTES + OVERHEAD_PER_VOCAB_BYTES * shape.n_vocab
    add("cpu", "overhead", overhead)

    order = ["cpu", *gpus]
    return MemoryEstimate(
        n_ctx=n_ctx,
        kv_cells=cells,
        weights_bytes=info.weights_bytes,
        repacked_bytes=repacked,
        kv_bytes=kv_total,
        compute_bytes=sum(parts[d]["compute"] for d in order),
        overhead_bytes=sum(parts[d]["overhead"] for d in order),
        devices=tuple(DeviceMemory(d, parts[d]["weights"], parts[d]["kv"], parts[d]["compute"],
                                   parts[d]["overhead"], parts[d]["layers"]) for d in order),
    )


def kv_bytes_per_token(info: GGUFInfo, type_k: str = "f16", type_v: str = "f16") -> float:
    """KV cache bytes one token of context costs over all (global) layers."""
    s = model_shape(info)
    bk, bv = CACHE_TYPE_BYTES[type_k], CACHE_TYPE_BYTES[type_v]
    return sum(s.n_head_kv[il] * (s.key_length * bk + s.value_length * bv) for il in range(s.n_layers))
