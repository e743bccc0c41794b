"""The inference worker: one process holding one model variant in llama-cpp-python.

Started by runtime.worker_client as ``python -m runtime.worker --model PATH ...``. It
speaks JSON lines: requests arrive on stdin, events leave on a private duplicate of
stdout (fd 1 itself is pointed at stderr so nothing llama.cpp prints can corrupt the
protocol). A segfault or OOM kill here takes down this process only.

Requests:  {"op": "generate", "id", "prompt" | "messages", "max_tokens", "max_tokens_cap",
            "temperature", "top_p", "stop", "seed"}  (max_tokens_cap bounds a missing max_tokens)
           {"op": "embed", "id", "input": [str, ...]}
           {"op": "cancel", "id"}
Events:    {"ev": "ready", "n_ctx", "chat", "embedding", "load_seconds", "pid"}
           {"ev": "start", "id", "prompt_tokens"}
           {"ev": "text", "id", "text"}
           {"ev": "done", "id", "finish_reason", "prompt_tokens", "completion_tokens"}
           {"ev": "embedding", "id", "data", "prompt_tokens"}
           {"ev": "error", "id", "kind", "message"}   kind: bad_request | context_length | internal
"""

from __future__ import annotations

import argparse
import codecs
import json
import logging
import os
import queue
import random
import sys
import threading
import time
from typing import IO, Any

from runtime.lifeline import die_with_parent

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request the worker refuses; `kind` tells the daemon which API error to raise."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class StopScanner:
    """Hold back text that might be the start of a stop string; report when one is hit."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was reached)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        """Text still held back when generation ends without a stop string."""
        out, self.pending = self.pending, ""
        return out


class Worker:
    """Holds the loaded model and runs one request at a time."""

    def __init__(self, args: argparse.Namespace, out: IO[str]) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.out = out
        self.cancelled: set[str] = set()
        self.lock = threading.Lock()
        t0 = time.perf_counter()
        kwargs: dict[str, Any] = {}
        if args.embedding:
            kwargs["embedding"] = True
            if args.pooling == "mean":
                kwargs["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        self.llm = llama_cpp.Llama(model_path=args.model, n_ctx=args.n_ctx, n_threads=args.threads,
                                   n_threads_batch=args.threads, n_batch=args.n_batch,
                                   n_gpu_layers=args.n_gpu_layers,
                                   seed=random.randrange(2**31), verbose=False, **kwargs)
        self.load_seconds = time.perf_counter() - t0
        self.embedding = bool(args.embedding)
        self.n_ctx = self.llm.n_ctx()
        self.formatter = None
        template = self.llm.metadata.get("tokenizer.chat_template")
        if template and not self.embedding:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            eos, bos = self.llm.token_eos(), self.llm.token_bos()
            model = self.llm._model
            self.formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_get_text(eos) if eos != -1 else "",
                bos_token=model.token_get_text(bos) if bos != -1 else "",
                stop_token_ids=[eos] if eos != -1 else None,
            )

    def send(self, **ev: Any) -> None:
        """Write one event line."""
        self.out.write(json.dumps(ev, ensure_ascii=False) + "\n")
        self.out.flush()

    def ready(self) -> None:
        """Announce the model is loaded."""
        self.send(ev="ready", n_ctx=self.n_ctx, chat=self.formatter is not None, embedding=self.embedding,
                  load_seconds=round(self.load_seconds, 4), pid=os.getpid())

    def handle(self, req: dict[str, Any]) -> None:
        """Run one request, turning refusals into error events."""
        rid = str(req.get("id"))
        try:
            if req.get("op") == "embed":
                self.embed(rid, req)
            else:
                self.generate(rid, req)
        except RequestError as e:
            self.send(ev="error", id=rid, kind=e.kind, message=str(e))
        except Exception as e:
            log.exception("request %s failed", rid)
            self.send(ev="error", id=rid, kind="internal", message=f"{type(e).__name__}: {e}")
        finally:
            with self.lock:
                self.cancelled.discard(rid)

    def _prompt_tokens(self, req: dict[str, Any]) -> tuple[list[int], list[str]]:
        stops = list(req.get("stop") or [])
        if self.embedding:
            raise RequestError("bad_request", "this model serves embeddings only, not text generation")
        if req.get("messages") is not None:
            if self.formatter is None:
                raise RequestError("bad_request", "this model has no chat template: use /v1/completions")
            r = self.formatter(messages=req["messages"])
            tokens = self.llm.tokenize(r.prompt.encode("utf-8"), add_bos=not r.added_special, special=True)
            if isinstance(r.stop, str):
                stops.append(r.stop)
            elif r.stop:
                stops.extend(r.stop)
        else:
            tokens = self.llm.tokenize(str(req.get("prompt", "")).encode("utf-8"), add_bos=True, special=False)
        return tokens, stops

    def generate(self, rid: str, req: dict[str, Any]) -> None:
        """Generate text for a completion or chat request, streaming text events."""
        tokens, stops = self._prompt_tokens(req)
        n_prompt = len(tokens)
        room = self.n_ctx - n_prompt
        if room < 1:
            raise RequestError("context_length", f"prompt is {n_prompt} tokens; the context window is "
                               f"{self.n_ctx} tokens and leaves no room to generate")
        max_tokens = req.get("max_tokens")
        if max_tokens is None:
            max_tokens = min(room, req.get("max_tokens_cap") or room)
        elif max_tokens > room:
            raise RequestError("context_length", f"this model's context window is {self.n_ctx} tokens; "
                               f"you requested {n_prompt + max_tokens} ({n_prompt} in the prompt, "
                               f"{max_tokens} max_tokens)")
        seed = req.get("seed")
        self.llm.set_seed(int(seed) if seed is not None else random.randrange(2**31))
        temperature = float(req.get("temperature", 1.0))
        self.send(ev="start", id=rid, prompt_tokens=n_prompt)
        scanner = StopScanner(stops)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = self.llm._model.vocab
        generated: list[int] = []
        finish = "length"
        for tok in self.llm.generate(tokens, temp=temperature, top_p=float(req.get("top_p", 1.0)),
                                     top_k=0 if temperature > 0 else 40, min_p=0.0, repeat_penalty=1.0):
            if self.llama_cpp.llama_vocab_is_eog(vocab, tok):
                finish = "stop"
                break
            generated.append(tok)
            piece = self.llm.detokenize([tok], prev_tokens=tokens + generated[:-1])
            text, hit = scanner.feed(decoder.decode(piece))
            if text:
                self.send(ev="text", id=rid, text=text)
            if hit:
                finish = "stop"
                break
            if len(generated) >= max_tokens:
                break
            with self.lock:
                if rid in self.cancelled:
                    finish = "cancelled"
                    break
        if finish != "stop":
            rest = scanner.flush() + decoder.decode(b"", final=True)
            if rest:
                self.send(ev="text", id=rid, text=rest)
        self.send(ev="done", id=rid, finish_reason=finish, prompt_tokens=n_prompt,
                  completion_tokens=len(generated))

    def embed(self, rid: str, req: dict[str, Any]) -> None:
        """Embed each input string."""
        if not self.embedding:
            raise RequestError("bad_request", "this model does not produce embeddings")
        inputs = [str(s) for s in req.get("input", [])]
        counts = [len(self.llm.tokenize(s.encode("utf-8"), add_bos=True)) for s in inputs]
        for s, n in zip(inputs, counts, strict=True):
            if n > self.n_ctx:
                raise RequestError("context_length", f"an input is {n} tokens; the context window is "
                                   f"{self.n_ctx} tokens ({s[:40]!r}...)")
        vectors = self.llm.embed(inputs, normalize=True, truncate=False)
        self.send(ev="embedding", id=rid, data=vectors, prompt_tokens=sum(counts))


def _reader(worker: Worker, jobs: queue.Queue[dict[str, Any] | None]) -> None:
    for line in sys.stdin:
        try:
            req = json.loads(line)
        except ValueError:
            log.error("ignoring a line that is not JSON: %r", line[:200])
            continue
        if req.get("op") == "cancel":
            with worker.lock:
                worker.cancelled.add(str(req.get("id")))
        else:
            jobs.put(req)
    jobs.put(None)


def main(argv: list[str] | None = None) -> None:
    """Load the model, announce readiness, serve requests until stdin closes."""
    ap = argparse.ArgumentParser(prog="python -m runtime.worker")
    ap.add_argument("--model", required=True)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="layers to offload (ignored by CPU-only builds)")
    ap.add_argument("--embedding", action="store_true")
    ap.add_argument("--pooling", choices=["model", "mean"], default="model")
    args = ap.parse_args(argv)
    die_with_parent()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"worker[{os.getpid()}] %(levelname)s %(message)s")
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    worker = Worker(args, proto)
    worker.ready()
    jobs: queue.Queue[dict[str, Any] | None] = queue.Queue()
    threading.Thread(target=_reader, args=(worker, jobs), daemon=True).start()
    while (req := jobs.get()) is not None:
        worker.handle(req)


if __name__ == "__main__":
    main()
