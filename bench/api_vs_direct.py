"""Benchmark: the daemon's HTTP API vs llama-cpp-python called directly, in one run.

    .venv/bin/python -m bench.api_vs_direct [--model PATH] [--tokens 128] [--rounds 3]

Prints, each a median over the rounds (runs alternate direct / HTTP so both see the
same machine state):
- single-stream decode tokens/s through the HTTP API (SSE) and directly, and the ratio;
- time to first token over HTTP minus direct;
- idle daemon RSS with no model loaded, and time from `atoll serve` to /readyz 200.
Same model, same threads (2), same prompt, greedy decoding.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
ATOLL = str(Path(sys.executable).with_name("atoll"))
MESSAGES = [{"role": "user", "content": "Write a detailed essay about the history of sailing ships."}]


def direct_run(llm: object, max_tokens: int) -> tuple[float, float, int]:
    """(ttft seconds, decode tokens/s, tokens) for one streamed chat completion in-process."""
    t0 = time.perf_counter()
    first = last = 0.0
    n = 0
    for chunk in llm.create_chat_completion(messages=MESSAGES, max_tokens=max_tokens,  # type: ignore[attr-defined]
                                            temperature=0, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            last = time.perf_counter()
            if n == 0:
                first = last
            n += 1
    return first - t0, (n - 1) / (last - first), n


def http_run(port: int, token: str, max_tokens: int) -> tuple[float, float, int]:
    """The same request through the daemon's SSE endpoint."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = json.dumps({"model": "bench", "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    first = last = 0.0
    n = 0
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data: {"):
            continue
        delta = json.loads(line[6:])["choices"][0]["delta"]
        if delta.get("content"):
            last = time.perf_counter()
            if n == 0:
                first = last
            n += 1
    conn.close()
    return first - t0, (n - 1) / (last - first), n


def wait_status(url: str, want: int, timeout: float = 120) -> None:
    """Poll url until it answers `want`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - loopback
                if r.status == want:
                    return
        except urllib.error.HTTPError as e:
            if e.code == want:
                return
        except OSError:
            pass
        time.sleep(0.005)
    raise SystemExit(f"{url} never answered {want}")


def start_daemon(state: Path, port: int) -> subprocess.Popen[bytes]:
    """`atoll serve` on loopback with 2 threads."""
    return subprocess.Popen([ATOLL, "serve", "--state-dir", str(state), "--host", "127.0.0.1", "--port", str(port),
                             "--threads", "2", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    """Run the benchmark and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=18080)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="atoll-bench-"))
    try:
        # idle daemon: no model at all
        empty = tmp / "empty"
        t0 = time.perf_counter()
        p = start_daemon(empty, args.port)
        wait_status(f"http://127.0.0.1:{args.port}/healthz", 200)
        time.sleep(1.0)
        idle_rss = psutil.Process(p.pid).memory_info().rss
        p.terminate()
        p.wait()
        healthz_s = time.perf_counter() - t0

        state = tmp / "state"
        subprocess.run([ATOLL, "models", "add", "--state-dir", str(state), "--family", "bench", args.model],
                       check=True, stdout=subprocess.DEVNULL)
        token = subprocess.run([ATOLL, "token", "create", "--state-dir", str(state), "--role", "user",
                                "--name", "bench"], check=True, capture_output=True, text=True).stdout.strip()
        t0 = time.perf_counter()
        p = start_daemon(state, args.port)
        wait_status(f"http://127.0.0.1:{args.port}/readyz", 200)
        ready_s = time.perf_counter() - t0

        from runtime.worker import load_llama

        llm = load_llama(args.model, n_ctx=2048, n_threads=2, n_threads_batch=2, verbose=False)
        direct_run(llm, 8)  # warm both paths
        http_run(args.port, token, 8)
        d_runs, h_runs = [], []
        for _ in range(args.rounds):
            d_runs.append(direct_run(llm, args.tokens))
            h_runs.append(http_run(args.port, token, args.tokens))
        p.terminate()
        p.wait()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    d_tps = statistics.median(r[1] for r in d_runs)
    h_tps = statistics.median(r[1] for r in h_runs)
    d_ttft = statistics.median(r[0] for r in d_runs) * 1000
    h_ttft = statistics.median(r[0] for r in h_runs) * 1000
    print(f"model {os.path.basename(args.model)}, {args.tokens} tokens, 2 threads, greedy, {args.rounds} rounds")
    print(f"tokens per run: direct {[r[2] for r in d_runs]}, http {[r[2] for r in h_runs]}")
    print(f"{'':28}{'direct':>10}{'http':>10}")
    print(f"{'decode tokens/s (median)':28}{d_tps:10.1f}{h_tps:10.1f}   ratio http/direct {h_tps / d_tps:.3f}")
    print(f"{'time to first token ms':28}{d_ttft:10.1f}{h_ttft:10.1f}   http - direct {h_ttft - d_ttft:+.1f} ms")
    print(f"idle daemon RSS, no model: {idle_rss / 2**20:.1f} MiB (healthz after {healthz_s:.2f} s)")
    print(f"atoll serve -> /readyz 200: {ready_s:.2f} s")


if __name__ == "__main__":
    main()
