"""The official `openai` package, unmodified apart from base_url, against the real daemon."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request

import openai
import psutil
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.e2e.conftest import ATOLL, Daemon

pytestmark = pytest.mark.slow

MSGS: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name three colours."}]


def client(d: Daemon, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=d.url + "/v1", api_key=token, max_retries=0, timeout=60)


def test_openai_client_chat_completions_models(daemon: Daemon) -> None:
    daemon.wait_ready()
    c = client(daemon, daemon.token())

    models = c.models.list()
    assert [m.id for m in models.data] == ["smollm2"]

    r = c.chat.completions.create(model="smollm2", messages=MSGS, max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage is not None and r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = c.chat.completions.create(model="smollm2", messages=MSGS, max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == text
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens

    comp = c.completions.create(model="smollm2", prompt="The sea is", max_tokens=6, temperature=0)
    assert comp.choices[0].text and comp.usage is not None and comp.usage.completion_tokens <= 6

    pieces = [ch.choices[0].text for ch in c.completions.create(model="smollm2", prompt="The sea is", max_tokens=6,
                                                                temperature=0, stream=True) if ch.choices]
    assert "".join(pieces) == comp.choices[0].text


def test_openai_client_sees_errors_as_its_own_exceptions(daemon: Daemon) -> None:
    daemon.wait_ready()
    c = client(daemon, daemon.token())
    with pytest.raises(openai.NotFoundError) as nf:
        c.chat.completions.create(model="gpt-99", messages=MSGS)
    assert "gpt-99" in str(nf.value)
    with pytest.raises(openai.BadRequestError) as br:
        c.chat.completions.create(model="smollm2", messages=MSGS, max_tokens=0)
    assert "max_tokens" in str(br.value)
    with pytest.raises(openai.AuthenticationError):
        client(daemon, "wrong").models.list()
    with pytest.raises(openai.BadRequestError) as emb:
        c.embeddings.create(model="smollm2", input="hello")
    assert "embeddings" in str(emb.value)


def test_status_then_clean_stop(daemon: Daemon) -> None:
    daemon.wait_ready()
    token = daemon.token()
    assert token not in "".join(daemon.lines)
    st = subprocess.run([ATOLL, "status", "--url", daemon.url], capture_output=True, text=True,
                        env={**os.environ, "ATOLL_TOKEN": token}, timeout=30)
    assert st.returncode == 0, st.stderr
    assert "ready" in st.stdout and "smollm2" in st.stdout
    js = json.loads(subprocess.run([ATOLL, "status", "--url", daemon.url, "--token", token, "--json"],
                                   capture_output=True, text=True, timeout=30).stdout)
    worker_pid = js["models"][0]["worker_pid"]
    assert psutil.pid_exists(worker_pid)
    # SIGTERM: the daemon drains, stops its workers and exits 0
    assert daemon.stop() == 0
    # checked at once, no grace: the daemon waits for (and reaps) its workers before it exits
    assert not psutil.pid_exists(worker_pid)
    assert "atoll stopped" in "".join(daemon.lines)


def test_openai_client_embeddings(state_dir, smollm2_path) -> None:
    from runtime.store import ModelStore

    ModelStore(state_dir).add_file(smollm2_path, family="smol-embed", task="embed")
    d = Daemon(state_dir)
    try:
        d.wait_ready()
        c = client(d, d.token())
        r = c.embeddings.create(model="smol-embed", input=["harbour", "harbour", "invoice"])  # base64 on the wire
        vecs = [e.embedding for e in r.data]
        assert [len(v) for v in vecs] == [576, 576, 576]
        assert vecs[0] == vecs[1] != vecs[2]
        floats = c.embeddings.create(model="smol-embed", input="harbour", encoding_format="float")
        assert floats.data[0].embedding == pytest.approx(vecs[0], abs=1e-6)
    finally:
        d.stop()


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_first_start_prints_a_setup_code_and_no_credential(state_dir) -> None:
    first = Daemon(state_dir)
    first.wait_ready()
    code = first.setup_code()
    assert (state_dir / "setup-code").stat().st_mode & 0o777 == 0o600
    assert any(f"{first.url}/auth/setup" in line for line in first.lines)
    body = {"code": code, "username": "ward-admin", "password": "a long enough password"}
    assert _post(f"{first.url}/auth/setup", body)[0] == 201
    status, err = _post(f"{first.url}/auth/setup", {**body, "username": "second-admin"})
    assert status == 401 and err["error"]["code"] == "setup_code_invalid"
    assert not (state_dir / "setup-code").exists()
    assert _post(f"{first.url}/auth/login", {"username": "ward-admin", "password": body["password"]})[0] == 200
    assert first.stop() == 0
    second = Daemon(state_dir)
    try:
        second.wait_ready()
        journal = "".join(first.lines + second.lines)
        assert "atoll_" not in journal and "setup code" not in "".join(second.lines)
        # the only secret the journal ever held is spent
        assert _post(f"{second.url}/auth/setup", {**body, "username": "late"})[0] == 401
        c = client(second, second.token())
        assert [m.id for m in c.models.list().data] == ["smollm2"]
    finally:
        second.stop()


def test_status_without_a_daemon_says_so(tmp_path) -> None:
    st = subprocess.run([ATOLL, "status", "--url", "http://127.0.0.1:9", "--token", "x"], capture_output=True,
                        text=True, timeout=30)
    assert st.returncode == 1 and "cannot reach the daemon" in st.stderr
