"""The inference worker: one process holding one model variant in llama-cpp-python.

Started by runtime.worker_client as ``python -m runtime.worker --model PATH ...``. It
speaks the typed JSON-lines protocol of runtime.protocol: requests arrive on stdin,
events leave on a private duplicate of stdout (fd 1 itself is pointed at stderr so
nothing llama.cpp prints can corrupt the protocol). A segfault or OOM kill here takes
down this process only.

Each request's deadline (`timeout`) and cancellation reach every stage: they are checked
before formatting, between the tokenized pieces of the prompt, and after every generated
token. A request that fails answers a typed `Error`; an unexpected exception is logged
here and answered with a fixed message, never its text.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import ctypes
import json
import logging
import os
import queue
import random
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

from runtime import protocol as p
from runtime.lifeline import die_with_parent
from runtime.prompt import (
    RequestError,
    StopScanner,
    chat_segments,
    check_fits,
    check_messages,
    check_text,
    prompt_runs,
    special_pattern,
)

log = logging.getLogger(__name__)


def cpu_has_amx() -> bool:
    """Whether this CPU advertises Intel AMX (read from /proc/cpuinfo; False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_int8" in line.split()
    except OSError:
        pass
    return False


@contextlib.contextmanager
def _weight_repacking(enabled: bool) -> Iterator[None]:
    """Load models with llama.cpp's extra CPU buffer types (weight repacking, AMX) on or off.

    llama-cpp-python's `Llama` does not expose `use_extra_bufts`, so the default model
    parameters it starts from are wrapped for the duration of the load.
    """
    import llama_cpp.llama_cpp as bindings  # the module `Llama` takes its defaults from

    original = bindings.llama_model_default_params

    def params() -> Any:
        p = original()
        p.use_extra_bufts = enabled
        return p

    bindings.llama_model_default_params = params
    try:
        yield
    finally:
        bindings.llama_model_default_params = original


def load_llama(model_path: str, **kwargs: Any) -> Any:
    """`llama_cpp.Llama(model_path, **kwargs)`, safe on AMX CPUs.

    llama.cpp's AMX matrix multiply segfaults on the first prompt on some AMX CPUs
    (ggml-org/llama.cpp#20824, seen on a Sapphire Rapids VM): there the AMX weight repack
    is skipped. Everything that loads a model in atoll (worker, tests, benchmarks) loads it here.
    """
    import llama_cpp

    repack = not cpu_has_amx()
    if not repack:
        log.info("this CPU has AMX: loading without llama.cpp's weight repacking (llama.cpp#20824)")
    with _weight_repacking(repack):
        return llama_cpp.Llama(model_path=model_path, **kwargs)


class Stopped(Exception):
    """The request was cancelled, or its deadline passed, before it finished."""

    def __init__(self, deadline: bool) -> None:
        super().__init__("deadline" if deadline else "cancelled")
        self.deadline = deadline


class Worker:
    """Holds the loaded model and runs one request at a time."""

    def __init__(self, args: argparse.Namespace, out: IO[bytes]) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.out = out
        self.cancelled: set[str] = set()
        self.lock = threading.Lock()  # guards `cancelled`, the counters and writes to `out`
        self.requests = self.prompts = self.prompt_tokens = 0
        t0 = time.perf_counter()
        kwargs: dict[str, Any] = {}
        if args.embedding:
            kwargs["embedding"] = True
            if args.pooling == "mean":
                kwargs["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        self.llm = load_llama(args.model, n_ctx=args.n_ctx, n_threads=args.threads,
                              n_threads_batch=args.threads, n_batch=args.n_batch, n_gpu_layers=args.n_gpu_layers,
                              seed=random.randrange(2**31), verbose=False, **kwargs)
        self.embedding = bool(args.embedding)
        self.n_ctx = self.llm.n_ctx()
        self.max_token_chars = self._longest_token()
        self.formatter = None
        self.special: re.Pattern[str] | None = None
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
            self.special = self._special_tokens()
        self.load_seconds = time.perf_counter() - t0

    def _longest_token(self) -> int:
        """Bytes in the vocabulary's longest token: a prompt of N characters is at least N / this tokens."""
        vocab = self.llm._model.vocab
        buf = ctypes.create_string_buffer(512)
        n = self.llama_cpp.llama_vocab_n_tokens(vocab)
        return max(1, max(self.llama_cpp.llama_token_to_piece(vocab, i, buf, 512, 0, True) for i in range(n)))

    def _special_tokens(self) -> re.Pattern[str] | None:
        """What llama.cpp parses as special when asked to (control and user-defined tokens)."""
        lc, model = self.llama_cpp, self.llm._model
        kinds = lc.LLAMA_TOKEN_ATTR_CONTROL | lc.LLAMA_TOKEN_ATTR_USER_DEFINED
        vocab = model.vocab
        return special_pattern([model.token_get_text(i) for i in range(lc.llama_vocab_n_tokens(vocab))
                                if lc.llama_vocab_get_attr(vocab, i) & kinds])

    def send(self, ev: p.Event) -> None:
        """Write one event line."""
        line = p.encode(ev)
        with self.lock:
            self.out.write(line)
            self.out.flush()

    def ready(self) -> None:
        """Announce the model is loaded."""
        self.send(p.Ready(n_ctx=self.n_ctx, chat=self.formatter is not None, embedding=self.embedding,
                          load_seconds=round(self.load_seconds, 4), pid=os.getpid()))

    def stats(self, rid: str) -> None:
        """Answer a stats query with the counters."""
        with self.lock:
            ev = p.Stats(id=rid, requests=self.requests, prompts=self.prompts, prompt_tokens=self.prompt_tokens)
        self.send(ev)

    def handle(self, req: p.Generate | p.Embed) -> None:
        """Run one request, turning refusals into error events."""
        rid = req.id
        deadline = time.monotonic() + req.timeout if req.timeout is not None else None
        with self.lock:
            self.requests += 1
        try:
            if isinstance(req, p.Embed):
                self.embed(rid, req, deadline)
            else:
                self.generate(rid, req, deadline)
        except RequestError as e:
            self.send(p.Error(id=rid, kind=e.kind, message=e.message, param=e.param))
        except Stopped as e:
            if e.deadline:
                self.send(p.Error(id=rid, kind="deadline", message="the request reached its deadline before "
                                  "its prompt was processed"))
            else:
                self.send(p.Done(id=rid, finish_reason="cancelled", prompt_tokens=0, completion_tokens=0))
        except Exception:
            log.exception("request %s failed", rid)
            self.send(p.Error(id=rid, kind="internal",
                              message="the model failed on this request; the daemon log has the details"))
        finally:
            with self.lock:
                self.cancelled.discard(rid)

    def _check(self, rid: str, deadline: float | None) -> None:
        """Raise Stopped if the request was cancelled or its deadline has passed."""
        with self.lock:
            if rid in self.cancelled:
                raise Stopped(deadline=False)
        if deadline is not None and time.monotonic() > deadline:
            raise Stopped(deadline=True)

    def _tokenize(self, text: str, *, special: bool, bos: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=bos, special=special)

    def _prompt_tokens(self, rid: str, req: p.Generate, deadline: float | None) -> tuple[list[int], list[str]]:
        """The prompt's tokens (client text never parsed for special tokens) and the stop strings."""
        stops = list(req.stop)
        if self.embedding:
            raise RequestError("bad_request", "this model serves embeddings only, not text generation", "model")
        if req.messages is not None:
            if self.formatter is None:
                raise RequestError("bad_request", "this model has no chat template: use /v1/completions",
                                   "messages")
            check_messages(req.messages, self.n_ctx, self.max_token_chars)
            self._check(rid, deadline)
            with self.lock:
                self.prompts += 1
            formatter = self.formatter
            segments, template_stops = chat_segments(
                lambda ms: formatter(messages=ms),  # type: ignore[arg-type]
                req.messages)
            stops.extend(template_stops)
            tokens: list[int] = []
            for text, special in prompt_runs(segments, self.special):
                self._check(rid, deadline)
                tokens.extend(self._tokenize(text, special=special))
                if len(tokens) > self.n_ctx:
                    break  # already too long: the caller reports it
            return tokens, stops
        prompt = req.prompt or ""
        if not prompt:
            raise RequestError("bad_request", "prompt is empty; send the text to complete", "prompt")
        check_text(prompt, "prompt")
        check_fits(len(prompt), self.n_ctx, self.max_token_chars, "prompt")
        self._check(rid, deadline)
        with self.lock:
            self.prompts += 1
        return self._tokenize(prompt, special=False, bos=True), stops

    def generate(self, rid: str, req: p.Generate, deadline: float | None) -> None:
        """Generate text for a completion or chat request, streaming text events."""
        tokens, stops = self._prompt_tokens(rid, req, deadline)
        n_prompt = len(tokens)
        with self.lock:
            self.prompt_tokens += n_prompt
        param = "messages" if req.messages is not None else "prompt"
        room = self.n_ctx - n_prompt
        if room < 1:
            raise RequestError("context_length", f"the prompt is {n_prompt}{'+' if n_prompt > self.n_ctx else ''} "
                               f"tokens; the context window is {self.n_ctx} tokens and leaves no room to generate",
                               param)
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = min(room, req.max_tokens_cap or room)
        elif max_tokens > room:
            raise RequestError("context_length", f"this model's context window is {self.n_ctx} tokens; "
                               f"you requested {n_prompt + max_tokens} ({n_prompt} in the prompt, "
                               f"{max_tokens} max_tokens)", "max_tokens")
        self._check(rid, deadline)
        self.llm.set_seed(req.seed if req.seed is not None else random.randrange(2**31))
        temperature = req.temperature
        self.send(p.Start(id=rid, prompt_tokens=n_prompt))
        scanner = StopScanner(stops)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = self.llm._model.vocab
        generated: list[int] = []
        finish = "length"
        for tok in self.llm.generate(tokens, temp=temperature, top_p=req.top_p,
                                     top_k=0 if temperature > 0 else 40, min_p=0.0, repeat_penalty=1.0):
            if self.llama_cpp.llama_vocab_is_eog(vocab, tok):
                finish = "stop"
                break
            generated.append(tok)
            piece = self.llm.detokenize([tok], prev_tokens=tokens + generated[:-1])
            text, hit = scanner.feed(decoder.decode(piece))
            if text:
                self.send(p.Text(id=rid, text=text))
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
                self.send(p.Text(id=rid, text=rest))
        self.send(p.Done(id=rid, finish_reason=finish, prompt_tokens=n_prompt, completion_tokens=len(generated)))

    def embed(self, rid: str, req: p.Embed, deadline: float | None) -> None:
        """Embed each input string."""
        if not self.embedding:
            raise RequestError("bad_request", "this model does not produce embeddings", "model")
        for i, s in enumerate(req.input):
            if not s:
                raise RequestError("bad_request", f"input[{i}] is empty", f"input[{i}]")
            check_text(s, f"input[{i}]")
            check_fits(len(s), self.n_ctx, self.max_token_chars, f"input[{i}]")
        with self.lock:
            self.prompts += 1
        counts = []
        for i, s in enumerate(req.input):
            self._check(rid, deadline)
            n = len(self._tokenize(s, special=False, bos=True))
            if n > self.n_ctx:
                raise RequestError("context_length", f"input[{i}] is {n} tokens; the context window is "
                                   f"{self.n_ctx} tokens", f"input[{i}]")
            counts.append(n)
        with self.lock:
            self.prompt_tokens += sum(counts)
        self._check(rid, deadline)
        vectors = self.llm.embed(req.input, normalize=True, truncate=False)
        self.send(p.Embedding(id=rid, data=vectors, prompt_tokens=sum(counts)))


def _line_id(line: bytes) -> str | None:
    """The request id of a line that is JSON but not a valid request, if it has one."""
    try:
        rid = json.loads(line).get("id")
    except (ValueError, AttributeError):
        return None
    return rid if isinstance(rid, str) else None


def _reader(worker: Worker, jobs: queue.Queue[p.Generate | p.Embed | None]) -> None:
    for line in sys.stdin.buffer:
        try:
            req = p.decode_request(line)
        except p.ProtocolError as e:
            log.error("refusing a request line that is not valid (%s): %r", e, line[:200])
            rid = _line_id(line)
            if rid is not None:  # answer it, so its request does not wait for its deadline
                worker.send(p.Error(id=rid, kind="internal", message="the worker could not read this request"))
            continue
        if isinstance(req, p.Cancel):
            with worker.lock:
                worker.cancelled.add(req.id)
        elif isinstance(req, p.StatsQuery):
            worker.stats(req.id)
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
    proto = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    worker = Worker(args, proto)
    worker.ready()
    jobs: queue.Queue[p.Generate | p.Embed | None] = queue.Queue()
    threading.Thread(target=_reader, args=(worker, jobs), daemon=True).start()
    while (req := jobs.get()) is not None:
        worker.handle(req)


if __name__ == "__main__":
    main()
