"""Check hardware.estimate against real llama-cpp-python loads.

For each model and context size, a fresh subprocess imports llama_cpp, records its RSS,
loads the model (n_threads=2, verbose=False), then records RSS after the load, after one
short completion, and after filling the context with one long prompt (the worst case the
compute-buffer approximation targets). The parent prints estimate vs measured growth.

    python -m bench.memory_estimate [--models DIR] [--ctx 512 2048 8192] [--no-fill]

"load" compares MemoryEstimate.loaded_bytes (weights + CPU repack copy + KV + overhead) with
the RSS growth after loading; "peak" compares MemoryEstimate.total_bytes with the RSS growth
after the context is full.

Measured on the 2-core build VM (llama-cpp-python 0.3.36, AVX-512 CPU backend), MiB:

    model            n_ctx | est load  meas load   err | meas short | est peak  meas peak   err
    SmolLM2 Q4_1       512 |   122.9     124.2   -1.0% |     127.0  |   146.8     146.3   +0.3%
    SmolLM2 Q4_1      2048 |   156.6     158.9   -1.4% |     161.8  |   224.0     224.1   -0.0%
    SmolLM2 Q4_1      8192 |   291.6     294.0   -0.8% |     296.9  |   533.0     531.5   +0.3%
    gemma-3 Q4_K_M     512 |   302.6     303.8   -0.4% |     310.1  |   323.8     329.4   -1.7%
    gemma-3 Q4_K_M    2048 |   329.6     331.9   -0.7% |     338.4  |   374.8     377.5   -0.7%
    gemma-3 Q4_K_M    8192 |   437.6     440.2   -0.6% |     446.5  |   578.8     589.4   -1.8%

The overhead constants were fitted on those six rows, so they are not an independent test.
Held-out checks (not used for fitting): SmolLM2 requantized locally to Q4_0 (repacked on the
CPU) and Q8_0, and gemma at other sizes:

    SmolLM2 Q4_0      1000 |   184.8     186.5   -0.9% |     189.4  |   223.1     221.7   +0.7%
    SmolLM2 Q4_0      4096 |   252.3     253.9   -0.7% |     256.9  |   377.6     376.7   +0.3%
    SmolLM2 Q8_0      1000 |   178.4     180.7   -1.2% |     183.5  |   216.8     215.8   +0.5%
    SmolLM2 Q8_0      4096 |   245.9     248.2   -0.9% |     251.0  |   371.3     370.8   +0.2%
    gemma-3 Q4_K_M    1000 |   311.6     313.7   -0.7% |     320.2  |   340.8     343.2   -0.7%
    gemma-3 Q4_K_M    4096 |   365.6     367.9   -0.6% |     374.3  |   442.8     453.4   -2.3%
    gemma-3 swa_full=False 8192: load 332.6 vs 334.2 (-0.5%), peak 473.8 vs 467.4 (+1.4%)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from hardware.estimate import estimate_memory
from hardware.gguf import read_gguf

MiB = 1 << 20
DEFAULT_MODELS = ("SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf")


def child(path: str, n_ctx: int, fill: bool) -> dict[str, float]:
    """Measure RSS growth of one load in this process (run in a fresh subprocess)."""
    import llama_cpp  # noqa: F401  (imported before the baseline RSS is read)
    import psutil

    from runtime.worker import load_llama

    proc = psutil.Process()

    def rss() -> float:
        return float(proc.memory_info().rss)

    before = rss()
    t0 = time.perf_counter()
    llm = load_llama(path, n_ctx=n_ctx, n_threads=2, verbose=False)
    load_s = time.perf_counter() - t0
    after_load = rss()
    llm("The capital of France is", max_tokens=8)
    after_short = rss()
    out = {"load": after_load - before, "short": after_short - before, "load_s": load_s}
    if fill:
        llm.reset()
        tokens = llm.tokenize(b" word" * n_ctx, add_bos=True)[: n_ctx - 8]
        llm.eval(tokens)
        out["peak"] = rss() - before
        out["fill_tokens"] = len(tokens)
    return out


def measure(path: Path, n_ctx: int, fill: bool) -> dict[str, float]:
    """Run `child` in a fresh interpreter and return its measurements."""
    code = ("import json, sys; from bench.memory_estimate import child; "
            f"print(json.dumps(child({str(path)!r}, {n_ctx}, {fill})))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    result: dict[str, float] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


def pct(est: float, meas: float) -> str:
    """Signed error of the estimate relative to the measurement."""
    return f"{100.0 * (est - meas) / meas:+.1f}%"


def main(argv: list[str] | None = None) -> int:
    """Print the estimate-vs-measured table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path(".cache/models"))
    ap.add_argument("--model", action="append", help="model file name(s) in --models")
    ap.add_argument("--ctx", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--no-fill", action="store_true", help="skip the full-context (peak) measurement")
    args = ap.parse_args(argv)
    fill = not args.no_fill
    head = (f"{'model':<34} {'n_ctx':>6} | {'est load':>8} {'meas load':>9} {'err':>7} | "
            f"{'meas short':>10} | {'est peak':>8} {'meas peak':>9} {'err':>7}   (MiB)")
    print(head)
    print("-" * len(head))
    for name in args.model or DEFAULT_MODELS:
        path = args.models / name
        info = read_gguf(path)
        for n_ctx in args.ctx:
            est = estimate_memory(info, n_ctx)
            m = measure(path, n_ctx, fill)
            el, et = est.loaded_bytes / MiB, est.total_bytes / MiB
            ml, ms = m["load"] / MiB, m["short"] / MiB
            peak = (f"{et:8.1f} {m['peak'] / MiB:9.1f} {pct(et, m['peak'] / MiB):>7}" if fill
                    else f"{et:8.1f} {'-':>9} {'-':>7}")
            print(f"{name:<34} {n_ctx:>6} | {el:8.1f} {ml:9.1f} {pct(el, ml):>7} | {ms:10.1f} | {peak}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
