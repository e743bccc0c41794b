"""Requests through the real daemon, served as `atoll serve` serves it, and the real worker.

The app runs under `daemon.serve.app_runner` (as in production, handlers are not cancelled
when a client disconnects; aiohttp's test server would cancel them and hide the defect).
Counting comes from the worker itself (its stats: requests received, prompts processed),
so "never dispatched" and "never processed" are measured, not assumed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from daemon.app import create_app
from daemon.auth import create_token
from daemon.config import Settings
from daemon.serve import SHUTDOWN_RETRY_AFTER, app_runner, drain_for_shutdown
from daemon.services import SERVICES, bootstrap
from runtime.runner import ModelRunner

LONG = {"model": "smollm2", "messages": [{"role": "user", "content": "Write a long story about the sea."}],
        "max_tokens": 400, "temperature": 0.8, "seed": 7}
SHORT = {"model": "smollm2", "prompt": "The sky is", "max_tokens": 2, "temperature": 0}


class Served:
    """The app under the production runner on a free port, with a user token and a client session."""

    def __init__(self, app: web.Application, settings: Settings, base: str, token: str,
                 session: aiohttp.ClientSession) -> None:
        self.app, self.settings, self.base, self.token, self.session = app, settings, base, token, session

    def url(self, path: str) -> str:
        """Absolute URL of a route."""
        return self.base + path

    def headers(self) -> dict[str, str]:
        """The user's Authorization header."""
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def runner(self) -> ModelRunner:
        """The smollm2 runner."""
        return self.app[SERVICES].scheduler.get("smollm2")

    async def worker_counts(self) -> tuple[int, int]:
        """(requests received, prompts processed) by the running worker."""
        worker = self.runner.worker
        assert worker is not None
        st = await worker.stats()
        return st.requests, st.prompts


@pytest.fixture
async def served(state_dir: Path) -> AsyncIterator[Served]:
    """The real daemon app over `state_dir`, served like `atoll serve`, its model loaded."""
    settings = Settings(state_dir=state_dir, threads=2, n_ctx=512, usb_watch=False, shutdown_drain_seconds=1.0)
    services = bootstrap(settings)
    token = create_token(services.db, "tester", "user")
    app = create_app(settings, services)
    runner = app_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as session:
        s = Served(app, settings, f"http://127.0.0.1:{port}", token, session)
        await until(s.runner.ready.is_set, timeout=60)
        try:
            yield s
        finally:
            await runner.cleanup()


async def until(cond: Any, timeout: float = 30) -> None:
    """Wait until cond() is true (polled on the event loop)."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def open_stream(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
    """Start a long streaming chat and return once its first token has arrived."""
    resp = await session.post(url, headers=headers, json={**LONG, "stream": True})
    assert resp.status == 200
    while not (await resp.content.readline()).startswith(b'data: {"id"'):
        pass
    return resp


def sse(raw: bytes) -> list[Any]:
    """The data payloads of a server-sent-event body."""
    out: list[Any] = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# -- 16: a queued request whose client has gone is dropped at once, never processed ------------------


async def test_queued_request_of_a_client_that_left_is_never_dispatched(served: Served) -> None:
    runner, url = served.runner, served.url("/v1/chat/completions")
    received0, prompts0 = await served.worker_counts()
    async with aiohttp.ClientSession() as leaver:
        running = await open_stream(served.session, url, served.headers())
        streaming_job = runner.running
        waiting = asyncio.create_task(leaver.post(url, headers=served.headers(), json=LONG))
        await until(lambda: len(runner.queue) == 1)
        left = runner.queue[0]
        waiting.cancel()
        await leaver.close()  # the queued request's client goes away
        await until(lambda: len(runner.queue) == 0, timeout=5)
    # It was dropped from the queue while the stream still ran, not dispatched after it.
    assert runner.running is streaming_job and left.cancelled and left.digest is None
    running.close()
    await until(lambda: runner.running is None)
    r = await served.session.post(served.url("/v1/completions"), headers=served.headers(), json=SHORT)
    assert r.status == 200
    # The worker got the stream and the last request: the one whose client left never reached it.
    assert await served.worker_counts() == (received0 + 2, prompts0 + 2)


# -- 18: SIGTERM's drain: nothing queued starts, queued get 503 + Retry-After, streams end cleanly ---


async def test_shutdown_refuses_queued_and_new_requests_and_ends_running_streams(served: Served) -> None:
    runner, url, s = served.runner, served.url("/v1/chat/completions"), served.session
    received0, prompts0 = await served.worker_counts()
    running = await open_stream(s, url, served.headers())
    queued = [asyncio.create_task(s.post(url, headers=served.headers(), json={**LONG, "stream": stream}))
              for stream in (False, True)]
    await until(lambda: len(runner.queue) == 2)
    drain = asyncio.create_task(drain_for_shutdown(served.app[SERVICES], served.settings))
    for resp in await asyncio.gather(*queued):
        assert resp.status == 503
        assert resp.headers["Retry-After"] == str(int(SHUTDOWN_RETRY_AFTER))
        assert (await resp.json())["error"]["code"] == "shutting_down"
    late = await s.post(url, headers=served.headers(), json=LONG)  # a new request during the drain
    assert late.status == 503 and "Retry-After" in late.headers
    assert (await late.json())["error"]["code"] == "shutting_down"
    # The running stream ends, past the drain time, with an error event, and the HTTP
    # response is complete (reading to the end raises nothing).
    events = sse(await running.read())
    await drain
    assert events[-1]["error"]["code"] == "interrupted" and events[-1]["error"]["type"] == "server_error"
    assert all("choices" in e for e in events[:-1])  # no [DONE]: the stream did not complete
    # Nothing queued was started: the worker processed only the stream that was running.
    assert await served.worker_counts() == (received0 + 1, prompts0 + 1)
    assert runner.running is None and not runner.queue


# -- 4 and 6 through the API: typed worker errors name the field; no exception text ------------------


async def test_worker_refusals_reach_the_client_as_400_naming_the_field(served: Served) -> None:
    _, prompts0 = await served.worker_counts()
    cases = [("/v1/completions", {**SHORT, "prompt": ""}, "prompt"),
             ("/v1/completions", {**SHORT, "prompt": "bad \ud800 text"}, "prompt"),
             ("/v1/chat/completions", {**LONG, "messages": [{"role": "user", "content": "x\udfffy"}]},
              "messages[0].content"),
             ("/v1/chat/completions", {**LONG, "messages": [{"role": "user", "content": ""}] * 20_000},
              "messages")]
    for path, body, param in cases:
        data = json.dumps(body).encode()  # lone surrogates travel as JSON escapes, as a client sends them
        r = await served.session.post(served.url(path), data=data,
                                      headers={**served.headers(), "Content-Type": "application/json"})
        text = await r.text()
        assert r.status == 400, (param, text)
        err = json.loads(text)["error"]
        assert err["param"] == param, (param, err)
        for leak in ("Error:", "Traceback", "AssertionError", "UnicodeEncodeError", "codec"):
            assert leak not in err["message"]
    assert (await served.worker_counts())[1] == prompts0  # nothing was formatted or tokenized
    r = await served.session.post(served.url("/v1/completions"), headers=served.headers(), json=SHORT)
    assert r.status == 200  # and the worker serves the next request
