"""SIGTERM to the real daemon while a stream runs and requests wait: every client gets a proper answer."""

from __future__ import annotations

import json
import signal
import threading
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from tests.e2e.conftest import Daemon

pytestmark = pytest.mark.slow

LONG: dict[str, Any] = {"model": "smollm2", "messages": [{"role": "user", "content": "Write a long story."}],
                        "max_tokens": 400, "temperature": 0.8, "seed": 3}


def post(url: str, token: str, body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
    """POST JSON; (status, headers, body) whatever the status."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def admin_status(d: Daemon, token: str) -> dict[str, Any]:
    req = urllib.request.Request(d.url + "/admin/status", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return dict(json.loads(r.read())["models"][0])


def test_sigterm_answers_queued_503_and_ends_the_running_stream_with_an_error(state_dir) -> None:
    d = Daemon(state_dir, "--no-usb-watch", "--n-ctx", "512", "--shutdown-drain-seconds", "1")
    try:
        d.wait_ready()
        token = d.token()
        c = openai.OpenAI(base_url=d.url + "/v1", api_key=token, max_retries=0, timeout=60)
        stream = c.chat.completions.create(stream=True, **LONG)
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        answers: list[tuple[int, dict[str, str], dict[str, Any]]] = []
        waiting = [threading.Thread(target=lambda: answers.append(post(d.url + "/v1/chat/completions", token, LONG)))
                   for _ in range(2)]
        for t in waiting:
            t.start()
        while admin_status(d, token)["queued"] < 2:
            pass
        d.proc.send_signal(signal.SIGTERM)
        # The running stream: its text so far, then an error event (the client raises), then the end.
        with pytest.raises(openai.APIError) as err:
            for _ in stream:
                pass
        assert "shutting down" in err.value.message and err.value.code == "interrupted"
        for t in waiting:
            t.join(timeout=30)
        assert len(answers) == 2
        for status, headers, body in answers:
            assert status == 503 and int(headers["Retry-After"]) > 0
            assert body["error"]["code"] == "shutting_down"
        assert d.proc.wait(timeout=30) == 0
    finally:
        d.stop()
    out = "".join(d.lines)
    assert "atoll stopped" in out and "Traceback" not in out
