"""Every route in /openapi.json needs credentials and the right role: generated, so a new route cannot slip by."""

from __future__ import annotations

from typing import Any

from daemon import access
from tests.daemon.conftest import SecApp

PROBES = {"/healthz", "/readyz"}


def concrete(path: str) -> str:
    """A request path for a templated route."""
    return path.replace("{username}", "nobody").replace("{name}", "nobody")


async def routes(a: SecApp) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path, operation) of every documented route."""
    r = await a.client.get("/openapi.json", headers=a.token("doc-reader", "auditor"))
    assert r.status == 200
    doc = await r.json()
    out = [(m.upper(), p, op) for p, ops in doc["paths"].items() for m, op in ops.items()]
    assert len(out) >= 25
    return out


async def test_every_route_refuses_without_credentials(sec_app: Any) -> None:
    a: SecApp = await sec_app()
    documented = await routes(a)
    before = a.snapshot()
    for method, path, op in documented:
        r = await a.client.request(method, concrete(path))
        body = await r.json()
        if path in PROBES:
            assert r.status in (200, 503) and op["security"] == [], path
            continue
        assert r.status == 401, (method, path, r.status, body)
        assert body["error"]["type"] == "authentication_error"
        if (method, path) in access.CREDENTIAL_ROUTES:
            assert op["security"] == [] and op["x-credentials"] == "body", path
        else:
            assert op["security"] == [{"bearer": []}, {"session": []}], path
    assert a.snapshot() == before


async def test_roles_are_enforced_on_every_route(sec_app: Any) -> None:
    a: SecApp = await sec_app()
    a.add_user("clerk", "user")
    a.add_user("officer", "auditor")
    headers = {"user-token": a.token("line-mes", "user"), "auditor-token": a.token("compliance", "auditor")}
    all_routes = await routes(a)
    cookies = {}
    for role, name in (("user", "clerk"), ("auditor", "officer")):
        r = await a.client.post("/auth/login", json={"username": name, "password": "correct horse battery"})
        cookies[role] = r.cookies["atoll_session"].value
        # a same-origin page with the right CSRF token: only the role can stop it
        headers[f"{role}-session"] = {"X-CSRF-Token": (await r.json())["csrf_token"], "Origin": a.origin}
        a.client.session.cookie_jar.clear()
    checked = 0
    before = {k: v for k, v in a.snapshot().items() if k != "audit_chain"}
    for method, path, op in all_routes:
        if path in PROBES or (method, path) in access.CREDENTIAL_ROUTES:
            continue
        roles = set(op["x-roles"])
        assert "admin" in roles
        for role in ("user", "auditor"):
            if role in roles:
                continue
            for kind in ("token", "session"):
                h = dict(headers[f"{role}-{kind}"])
                ck = {"atoll_session": cookies[role]} if kind == "session" else None
                r = await a.client.request(method, concrete(path), headers=h, cookies=ck, json={})
                assert r.status == 403, (role, kind, method, path, r.status, await r.text())
                assert (await r.json())["error"]["code"] == "insufficient_role"
                checked += 1
    assert checked > 40
    assert {k: v for k, v in a.snapshot().items() if k != "audit_chain"} == before
    # what the roles mean, read from the same document
    inference = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings")}
    auditor = {(m, p) for m, p, op in all_routes if "auditor" in op.get("x-roles", [])}
    assert not auditor & inference
    # an auditor changes nothing on the box: only their own session and password
    assert {(m, p) for m, p in auditor if m != "GET"} == {("POST", "/auth/logout"), ("POST", "/auth/password")}
    user = {(m, p) for m, p, op in all_routes if "user" in op.get("x-roles", [])}
    assert inference <= user and not any(p.startswith("/admin/") for _, p in user)


async def test_unknown_routes_need_credentials_then_say_404_or_405(sec_app: Any) -> None:
    a: SecApp = await sec_app()
    assert (await a.client.get("/v1/nothing")).status == 401
    h = a.token("line", "user")
    assert (await a.client.get("/v1/nothing", headers=h)).status == 404
    assert (await a.client.get("/admin/nothing", headers=h)).status == 404
    r = await a.client.get("/v1/chat/completions", headers=h)
    assert r.status == 405 and "POST" in r.headers["Allow"]
