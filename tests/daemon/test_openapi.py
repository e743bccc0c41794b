"""/openapi.json checked against the real app: the routes its router dispatches and the bodies it refuses."""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema
from aiohttp.test_utils import make_mocked_request

# One body per documented request schema that the schema accepts (checked below against the document). The bodies
# it forbids are derived from the document itself, so a field documented but not enforced fails here.
VALID: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"model": "smollm2", "prompt": "hi"},
    "/v1/embeddings": {"model": "smollm2", "input": "hi"},
    "/admin/bundles": {"path": "/nonexistent/stick"},
    "/admin/users": {"username": "nurse", "password": "a long enough password", "role": "user"},
    "/admin/tokens": {"name": "mes", "role": "user", "expires_in_days": 7, "rate_per_minute": 60,
                      "daily_token_quota": 1000},
    "/auth/login": {"username": "nurse", "password": "a long enough password"},
    "/auth/setup": {"code": "AAAA-AAAA-AAAA", "username": "nurse", "password": "a long enough password"},
    "/auth/password": {"current_password": "a long enough password", "new_password": "another long password"},
}
# one value of each JSON type, to find one a property's schema does not allow
SAMPLES: list[tuple[str, Any]] = [("object", {"x": 1}), ("array", [{"x": 1}]), ("string", "not-an-option"),
                                  ("integer", 123456789), ("boolean", True), ("null", None)]


def allowed_types(schema: dict[str, Any]) -> set[str] | None:
    """The JSON types a property schema admits (None when it does not say, e.g. only an enum)."""
    if "anyOf" in schema:
        parts = [allowed_types(s) for s in schema["anyOf"]]
        return None if any(p is None for p in parts) else set().union(*parts)  # type: ignore[arg-type]
    t = schema.get("type")
    if t is None:
        return None
    types = {t} if isinstance(t, str) else set(t)
    return types | {"integer"} if "number" in types else types


def forbidden_value(schema: dict[str, Any]) -> Any:
    """A value the property schema forbids, by type or by enum/const."""
    types = allowed_types(schema)
    for name, value in SAMPLES:
        if types is not None and name not in types:
            return value
        if types is None and ("enum" in schema or "const" in schema) and \
                value not in schema.get("enum", [schema.get("const")]):
            return value
    raise AssertionError(f"no forbidden value found for {schema}")


async def openapi(app: Any) -> dict[str, Any]:
    r = await app.client.get("/openapi.json", headers=app.headers())
    assert r.status == 200
    return dict(await r.json())


async def test_every_route_is_documented_and_every_documented_operation_is_served(make_app) -> None:
    app = await make_app()
    doc = await openapi(app)
    router = app.app.router
    # the router's own table, not the list it was built from
    served = {(r.method, r.resource.canonical) for r in router.routes() if r.method != "HEAD" and r.resource}
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented, (served ^ documented)
    for template, ops in doc["paths"].items():
        path = re.sub(r"\{[^}]+\}", "x", template)  # /admin/users/{username} -> /admin/users/x
        for method, op in ops.items():
            # the router dispatches this method and path to the handler the document names
            match = await router.resolve(make_mocked_request(method.upper(), path))
            assert match.http_exception is None, (method, path)
            assert match.handler.__name__ == op["operationId"], (method, path)
            # and the documented security is what the app does: without a token, public answers, the rest is 401
            no_token = await app.client.request(method.upper(), path)
            if op["security"] or op.get("x-credentials") == "body":  # login/setup: the body is the credential
                assert no_token.status == 401, (method, path)
            else:
                assert no_token.status in (200, 503), (method, path, no_token.status)
    # an undocumented path or method is not served
    assert (await app.client.get("/v1/undocumented", headers=app.headers())).status == 404
    assert (await app.client.delete("/v1/models", headers=app.headers(admin=True))).status == 405


async def test_documented_request_schemas_are_the_ones_enforced(make_app) -> None:
    app = await make_app()
    doc = await openapi(app)
    with_bodies = {path: ops["post"]["requestBody"]["content"]["application/json"]["schema"]
                   for path, ops in doc["paths"].items() if "requestBody" in ops.get("post", {})}
    assert set(with_bodies) == set(VALID)  # every documented body is exercised here
    for path, schema in with_bodies.items():
        jsonschema.validate(VALID[path], schema)  # the base body is one the document allows

        async def refused(body: Any, field: str | None, path: str = path) -> None:
            r = await app.client.post(path, json=body, headers=app.headers(admin=path.startswith("/admin")))
            assert r.status == 400, (path, body, r.status, await r.text())
            err = (await r.json())["error"]
            assert err["type"] == "invalid_request_error" and err["code"], (path, err)
            if field is not None:
                assert field in (err["param"] or "") + err["message"], (path, field, err)

        await refused([VALID[path]], None)  # not an object
        for field in schema["required"]:
            body = copy.deepcopy(VALID[path])
            del body[field]
            await refused(body, field)
        for field, prop in schema["properties"].items():
            bad = forbidden_value(prop)
            try:
                jsonschema.validate({**VALID[path], field: bad}, schema)
            except jsonschema.ValidationError:
                pass
            else:
                raise AssertionError(f"{path} {field}: {bad!r} was meant to be forbidden")
            await refused({**VALID[path], field: bad}, field)
    # nothing was accepted: no import ran, no request was served
    assert (await (await app.client.get("/admin/usage", headers=app.headers(admin=True))).json())["data"] == []
