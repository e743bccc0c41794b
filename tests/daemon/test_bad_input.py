"""Bad input gets a clear 4xx in OpenAI's error shape, never a 500, and changes nothing."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import snapshot_tree

OK_MSGS = [{"role": "user", "content": "hi"}]


def _check_error(body: Any, status: int) -> dict[str, Any]:
    assert set(body) == {"error"}
    err = body["error"]
    assert {"message", "type", "code"} <= set(err)
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error") or status in (401, 403)
    return dict(err)


CASES: list[tuple[str, str, bytes | dict[str, Any], int, str]] = [
    ("malformed json", "/v1/chat/completions", b'{"model": "smollm2", "messages": [', 400, "not valid JSON"),
    ("body not an object", "/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("non-utf8 body", "/v1/chat/completions", b'{"model": "smollm2\xff\xfe"}', 400, "UTF-8"),
    ("wrong type max_tokens", "/v1/chat/completions",
     {"model": "smollm2", "messages": OK_MSGS, "max_tokens": "ten"}, 400, "max_tokens"),
    ("wrong type temperature", "/v1/chat/completions",
     {"model": "smollm2", "messages": OK_MSGS, "temperature": "hot"}, 400, "temperature"),
    ("temperature out of range", "/v1/chat/completions",
     {"model": "smollm2", "messages": OK_MSGS, "temperature": 7}, 400, "temperature"),
    ("messages not a list", "/v1/chat/completions", {"model": "smollm2", "messages": "hi"}, 400, "messages"),
    ("messages empty", "/v1/chat/completions", {"model": "smollm2", "messages": []}, 400, "messages"),
    ("unknown role", "/v1/chat/completions",
     {"model": "smollm2", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("message without content", "/v1/chat/completions",
     {"model": "smollm2", "messages": [{"role": "user"}]}, 400, "content"),
    ("missing model", "/v1/chat/completions", {"messages": OK_MSGS}, 400, "model"),
    ("max_tokens zero", "/v1/chat/completions",
     {"model": "smollm2", "messages": OK_MSGS, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", "/v1/completions", {"model": "smollm2", "prompt": "x", "max_tokens": -5}, 400,
     "max_tokens"),
    ("max_tokens beyond context", "/v1/chat/completions",
     {"model": "smollm2", "messages": OK_MSGS, "max_tokens": 100000}, 400, "context window"),
    ("max_tokens plus prompt beyond context", "/v1/chat/completions",
     {"model": "smollm2", "messages": OK_MSGS, "max_tokens": 500}, 400, "context window"),
    ("prompt longer than context", "/v1/completions",
     {"model": "smollm2", "prompt": "word " * 2000, "max_tokens": 1}, 400, "context window"),
    ("chat prompt longer than context", "/v1/chat/completions",
     {"model": "smollm2", "messages": [{"role": "user", "content": "word " * 2000}]}, 400, "context window"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-17", "messages": OK_MSGS}, 404, "gpt-17"),
    ("unknown model completions", "/v1/completions", {"model": "nope", "prompt": "x"}, 404, "nope"),
    ("unsupported n", "/v1/chat/completions", {"model": "smollm2", "messages": OK_MSGS, "n": 3}, 400, "n"),
    ("prompt wrong type", "/v1/completions", {"model": "smollm2", "prompt": 42}, 400, "prompt"),
    ("embeddings empty input list", "/v1/embeddings", {"model": "smollm2", "input": []}, 400, "input"),
    ("stop wrong type", "/v1/completions", {"model": "smollm2", "prompt": "x", "stop": 5}, 400, "stop"),
]


@pytest.mark.parametrize(("path", "payload", "status", "needle"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
async def test_bad_request_is_refused_clearly_and_changes_nothing(make_app, state_dir, path, payload, status,
                                                                  needle) -> None:
    app = await make_app()
    before = snapshot_tree(state_dir)
    kwargs: dict[str, Any] = {"data": payload} if isinstance(payload, bytes) else {"json": payload}
    r = await app.client.post(path, headers={**app.headers(), "Content-Type": "application/json"}, **kwargs)
    assert r.status == status, await r.text()
    err = _check_error(await r.json(), status)
    assert needle in err["message"], err
    assert snapshot_tree(state_dir) == before
    # the model still serves, unaffected
    ok = await app.client.post("/v1/chat/completions", headers=app.headers(),
                               json={"model": "smollm2", "messages": OK_MSGS, "max_tokens": 2})
    assert ok.status == 200


async def test_body_over_the_limit_is_413(make_app, state_dir) -> None:
    app = await make_app(max_body_bytes=4096)
    before = snapshot_tree(state_dir)
    r = await app.client.post("/v1/completions", headers=app.headers(),
                              json={"model": "smollm2", "prompt": "x" * 10000})
    assert r.status == 413
    err = _check_error(await r.json(), 413)
    assert "4096" in err["message"]
    assert snapshot_tree(state_dir) == before


async def test_unknown_route_and_method_use_the_error_shape(make_app) -> None:
    app = await make_app()
    r = await app.client.get("/v1/nothing", headers=app.headers())
    assert r.status == 404
    _check_error(await r.json(), 404)
    r = await app.client.get("/v1/chat/completions", headers=app.headers())
    assert r.status == 405
    assert "POST" in r.headers["Allow"]
    assert (await r.json())["error"]["message"]


@pytest.mark.parametrize("header", [None, "Bearer", "Basic dXNlcjpwYXNz", "Bearer atoll_00000000_" + "A" * 43,
                                    "Bearer not-a-token"])
async def test_missing_or_bad_token_is_401(make_app, header) -> None:
    app = await make_app()
    headers = {"Authorization": header} if header else {}
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/openapi.json"),
                         ("GET", "/admin/status")):
        r = await app.client.request(method, path, headers=headers, json={})
        assert r.status == 401, (path, header)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await r.json())["error"]["type"] == "authentication_error"


async def test_tampered_token_is_401(make_app) -> None:
    app = await make_app()
    t = app.user_token
    tampered = t[:-1] + ("A" if t[-1] != "A" else "B")
    r = await app.client.get("/v1/models", headers={"Authorization": f"Bearer {tampered}"})
    assert r.status == 401


async def test_user_token_on_admin_route_is_403(make_app) -> None:
    app = await make_app()
    r = await app.client.get("/admin/status", headers=app.headers())
    assert r.status == 403
    err = (await r.json())["error"]
    assert err["type"] == "permission_error" and "admin" in err["message"]
    assert (await app.client.get("/admin/status", headers=app.headers(admin=True))).status == 200


async def test_revoked_token_stops_working_at_once(make_app) -> None:
    from daemon.auth import revoke_token
    from daemon.db import StateDB

    app = await make_app()
    assert (await app.client.get("/v1/models", headers=app.headers())).status == 200
    revoke_token(StateDB(app.settings.db_path), "tester")  # as `atoll token revoke` does, from outside
    r = await app.client.get("/v1/models", headers=app.headers())
    assert r.status == 401 and (await r.json())["error"]["code"] == "token_revoked"
