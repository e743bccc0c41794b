"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import struct
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

from daemon.bodies import Precheck, read_json
from daemon.middleware import PRINCIPAL, client_gone, error_body
from daemon.schemas import CHAT_REQUEST, COMPLETION_REQUEST, EMBEDDING_REQUEST
from daemon.services import SERVICES, Services
from runtime import protocol as p
from runtime.errors import AtollError, BadRequest, ContextLengthExceeded, Unavailable
from runtime.scheduler import Job, ModelRunner

log = logging.getLogger(__name__)


@dataclass
class Usage:
    """What one request cost; written to the usage table when it ends."""

    endpoint: str
    model: str
    principal: str
    digest: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)
    ttft_ms: float | None = None
    status: str = "ok"
    http_status: int = 200
    prompt_text: str | None = None
    completion_text: str | None = None

    def row(self) -> dict[str, Any]:
        """The usage table row."""
        return {"principal": self.principal, "endpoint": self.endpoint, "model": self.model,
                "digest": self.digest, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "latency_ms": round((time.perf_counter() - self.t0) * 1000, 2), "ttft_ms": self.ttft_ms,
                "status": self.status, "http_status": self.http_status,
                "prompt_text": self.prompt_text, "completion_text": self.completion_text}


def _sampling(body: dict[str, Any], n_ctx: int | None, default_max: int | None, cap: int | None) -> dict[str, Any]:
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or default_max
    if n_ctx is not None and max_tokens is not None and max_tokens >= n_ctx:
        raise ContextLengthExceeded(f"max_tokens {max_tokens} is beyond the model's context window of "
                                    f"{n_ctx} tokens", param="max_tokens")
    if cap is not None and max_tokens is not None and max_tokens > cap:
        raise BadRequest(f"max_tokens {max_tokens} is over the site policy's limit of {cap}", param="max_tokens",
                         code="policy_limit")
    stop = body.get("stop")
    temperature, top_p = body.get("temperature"), body.get("top_p")
    return {"max_tokens": max_tokens, "max_tokens_cap": cap,
            "temperature": 1.0 if temperature is None else temperature,
            "top_p": 1.0 if top_p is None else top_p, "seed": body.get("seed"),
            "stop": [stop] if isinstance(stop, str) else list(stop or [])}


def _usage_json(u: Usage) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


class Generation:
    """One text generation request from submission to the usage record."""

    def __init__(self, request: web.Request, endpoint: str, body: dict[str, Any]) -> None:
        self.request = request
        self.services: Services = request.app[SERVICES]
        self.body = body
        self.runner: ModelRunner = self.services.scheduler.get(body["model"])
        self.usage = Usage(endpoint=endpoint, model=self.runner.family, principal=request[PRINCIPAL].name,
                           digest=self.runner.variant.digest)
        self.id = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.text: list[str] = []
        self.job: Job | None = None

    def n_ctx(self) -> int | None:
        """The loaded model's context window, if it is loaded."""
        info = self.runner.worker.ready_info if self.runner.worker else None
        return info.n_ctx if info else None

    def submit(self, worker_request: p.Generate | p.Embed) -> Job:
        """Queue the request (raises 429/503 as the runner decides)."""
        if self.services.limits.log_prompts and isinstance(worker_request, p.Generate):
            self.usage.prompt_text = json.dumps([asdict(m) for m in worker_request.messages]
                                                if worker_request.messages is not None else worker_request.prompt)
        self.job = self.runner.submit(worker_request)
        return self.job

    async def events(self, job: Job) -> AsyncGenerator[p.Event]:
        """The job's events, with usage filled in; stops (cancelling the job) if the client leaves,
        even while the job is still queued (then it raises ClientGone, a ConnectionResetError)."""
        async with contextlib.aclosing(self.runner.stream(job, lambda: client_gone(self.request))) as stream:
            async for ev in stream:
                if isinstance(ev, p.Start):
                    self.usage.prompt_tokens = ev.prompt_tokens
                    self.usage.ttft_ms = round((time.perf_counter() - self.usage.t0) * 1000, 2)
                elif isinstance(ev, p.Text):
                    self.text.append(ev.text)
                elif isinstance(ev, p.Done):
                    self.usage.prompt_tokens = ev.prompt_tokens
                    self.usage.completion_tokens = ev.completion_tokens
                yield ev
                if client_gone(self.request):
                    self.usage.status = "cancelled"
                    self.usage.http_status = 499
                    return

    def finish(self, error: BaseException | None = None) -> None:
        """Record usage in the background (never the text unless log_prompts is on)."""
        if isinstance(error, AtollError):
            self.usage.status, self.usage.http_status = f"error:{error.code}", error.status
        elif error is not None and self.usage.status == "ok":
            self.usage.status, self.usage.http_status = "cancelled", 499
        if self.services.limits.log_prompts:
            self.usage.completion_text = "".join(self.text)
        row = self.usage.row()
        self.services.spawn(self._record(row))

    async def _record(self, row: dict[str, Any]) -> None:
        # A cancelled or timed-out job is still stopping in its worker: wait for its last
        # event so the row counts the tokens the worker really produced.
        job = self.job
        if job is not None and not job.finished.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await job.finished.wait()
        if job is not None and job.digest:
            row["digest"] = job.digest
        if job is not None and isinstance(job.final, p.Done):
            row["completion_tokens"] = job.final.completion_tokens
            row["prompt_tokens"] = job.final.prompt_tokens
        db = self.services.db
        await db.run(db.record_usage, row)


def _messages(body: dict[str, Any]) -> list[p.Message]:
    out = []
    for m in body["messages"]:
        content = m["content"]
        if isinstance(content, list):
            content = "".join(part["text"] for part in content)
        role = "system" if m["role"] == "developer" else m["role"]
        out.append(p.Message(role=role, content=content))
    return out


def _texts(value: Any) -> list[str]:
    """The strings of a prompt, an input or a message content (the shapes the schemas allow)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        out = []
        for item in value:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                out.append(item["text"])
        return out
    return []


def work_bound(services: Services, field_name: str) -> Precheck:
    """A cheap check, before validating or tokenizing, that the prompt could fit the context window.

    No token in any vocabulary atoll serves is longer than `max_chars_per_token` characters and
    every chat message costs at least one token, so a prompt with more characters than
    n_ctx * max_chars_per_token, or more messages than n_ctx (or `max_messages`), cannot fit:
    it is refused at once instead of occupying the model's worker.
    """
    n_ctx = services.scheduler.config.n_ctx
    max_chars = n_ctx * services.settings.max_chars_per_token

    def check(body: dict[str, Any]) -> None:
        value = body.get(field_name)
        if field_name == "messages" and isinstance(value, list):
            limit = min(n_ctx, services.settings.max_messages)
            if len(value) > limit:
                raise BadRequest(f"messages: {len(value)} messages are more than the limit of {limit}",
                                 param="messages", code="too_many_messages")
            texts = [t for m in value if isinstance(m, dict) for t in _texts(m.get("content"))]
        else:
            texts = _texts(value)
        chars = sum(len(t) for t in texts)
        if chars > max_chars:
            raise ContextLengthExceeded(f"{field_name}: {chars} characters cannot fit the context window of "
                                        f"{n_ctx} tokens", param=field_name)
    return check


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    body = await read_json(request, CHAT_REQUEST, work_bound(request.app[SERVICES], "messages"))
    gen = Generation(request, "chat", body)
    return await _respond(gen, chat=True, build=lambda: p.Generate(
        messages=_messages(body), **_sampling(body, gen.n_ctx(), None, gen.services.limits.max_tokens)))


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions."""
    body = await read_json(request, COMPLETION_REQUEST, work_bound(request.app[SERVICES], "prompt"))
    gen = Generation(request, "completions", body)
    return await _respond(gen, chat=False, build=lambda: p.Generate(
        prompt=body["prompt"] if isinstance(body["prompt"], str) else body["prompt"][0],
        **_sampling(body, gen.n_ctx(), gen.services.settings.completion_max_tokens_default,
                    gen.services.limits.max_tokens)))


async def _respond(gen: Generation, *, chat: bool, build: Callable[[], p.Generate]) -> web.StreamResponse:
    """Run a generation and answer it whole or streamed; usage is recorded either way."""
    try:
        job = gen.submit(build())
        if gen.body.get("stream"):
            return await _stream(gen, job, chat=chat)
        fin = "stop"
        async for ev in gen.events(job):
            if isinstance(ev, p.Done):
                fin = ev.finish_reason
        gen.finish()
        text = "".join(gen.text)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": fin}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return web.json_response({
            "id": gen.id, "object": "chat.completion" if chat else "text_completion", "created": gen.created,
            "model": gen.runner.family,
            "system_fingerprint": f"sha256-{(job.digest or gen.runner.variant.digest)[:16]}",
            "choices": [choice], "usage": _usage_json(gen.usage)})
    except BaseException as e:
        gen.finish(e)
        raise


async def _stream(gen: Generation, job: Job, *, chat: bool) -> web.StreamResponse:
    """Send the job's tokens as server-sent events; errors before the first token stay HTTP errors."""
    request = gen.request
    obj = "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool((gen.body.get("stream_options") or {}).get("include_usage"))
    resp: web.StreamResponse | None = None

    def chunk(delta: dict[str, Any] | None = None, text: str | None = None,
              finish: str | None = None) -> bytes:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["delta"] = delta or {}
        else:
            choice["text"] = text or ""
        payload = {"id": gen.id, "object": obj, "created": gen.created, "model": gen.runner.family,
                   "choices": [choice]}
        return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"

    try:
        async with contextlib.aclosing(gen.events(job)) as events:
            async for ev in events:
                if isinstance(ev, p.Start):
                    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                       "Cache-Control": "no-cache"})
                    await resp.prepare(request)
                    if chat:
                        await resp.write(chunk({"role": "assistant", "content": ""}))
                elif isinstance(ev, p.Text) and resp is not None:
                    await resp.write(chunk({"content": ev.text}, text=ev.text))
                elif isinstance(ev, p.Done) and resp is not None:
                    fin = ev.finish_reason
                    await resp.write(chunk({}, finish=fin if fin != "cancelled" else "stop"))
                    if include_usage:
                        payload = {"id": gen.id, "object": obj, "created": gen.created,
                                   "model": gen.runner.family, "choices": [], "usage": _usage_json(gen.usage)}
                        await resp.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
                    await resp.write(b"data: [DONE]\n\n")
    except AtollError as e:
        if resp is None:
            raise
        gen.finish(e)
        # The stream ends properly: the error as its last event (no [DONE]: it did not complete),
        # then the chunked end.
        await resp.write(b"data: " + json.dumps(error_body(e)).encode() + b"\n\n")
        await resp.write_eof()
        return resp
    except (ConnectionResetError, OSError) as e:
        gen.usage.status, gen.usage.http_status = "cancelled", 499
        log.info("client left during %s: %s", gen.id, e)
        gen.finish()
        return resp or web.StreamResponse()
    gen.finish()
    if resp is None:
        raise Unavailable("the model produced no answer")
    return resp


async def embeddings(request: web.Request) -> web.Response:
    """POST /v1/embeddings."""
    body = await read_json(request, EMBEDDING_REQUEST, work_bound(request.app[SERVICES], "input"))
    gen = Generation(request, "embeddings", body)
    try:
        if gen.runner.variant.task != "embed":
            raise BadRequest(f"model {gen.runner.family!r} does not produce embeddings; it serves text "
                             f"generation (add an embedding model, or one with --task embed)",
                             param="model", code="embeddings_not_supported")
        inputs = [body["input"]] if isinstance(body["input"], str) else body["input"]
        job = gen.submit(p.Embed(input=inputs))
        data: list[list[float]] = []
        async for ev in gen.events(job):
            if isinstance(ev, p.Embedding):
                data = ev.data
                gen.usage.prompt_tokens = ev.prompt_tokens
        gen.finish()
        encode: Any = _b64_floats if body.get("encoding_format") == "base64" else list
        return web.json_response({
            "object": "list", "model": gen.runner.family,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(data)],
            "usage": {"prompt_tokens": gen.usage.prompt_tokens, "total_tokens": gen.usage.prompt_tokens}})
    except BaseException as e:
        gen.finish(e)
        raise


def _b64_floats(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: every model family, with its state (OpenAI clients ignore the extra fields)."""
    services = request.app[SERVICES]
    data = []
    for name, r in sorted(services.scheduler.runners.items()):
        st = r.status()
        data.append({"id": name, "object": "model", "created": 0, "owned_by": "atoll",
                     "state": st["state"], "reason": st["reason"], "task": st["task"],
                     "quantization": st["quantization"], "n_ctx": st["n_ctx"], "chat": st["chat"]})
    return web.json_response({"object": "list", "data": data})
