"""Hostile bodies at the edge: huge integers, deep nesting, NaN, wrong media types, refused fields,
empty and invalid prompts, bodies that would hold the model for minutes, disk full. Each is a 4xx
(or 507) in the documented shape naming the field, and leaves the state unchanged."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest

from daemon.schemas import ACCEPTED_IGNORED, CHAT_REQUEST, COMPLETION_REQUEST, EMBEDDING_REQUEST, NOT_IMPLEMENTED
from runtime import protocol as p
from runtime.runner import _worker_error
from tests.conftest import snapshot_tree
from tests.daemon.probes import healthz_latencies

ROOT = Path(__file__).resolve().parents[2]
MSGS = [{"role": "user", "content": "hi"}]
BASE: dict[str, dict[str, Any]] = {"/v1/chat/completions": {"model": "smollm2", "messages": MSGS},
        "/v1/completions": {"model": "smollm2", "prompt": "hi"},
        "/v1/embeddings": {"model": "smollm2", "input": "hi"}}
SCHEMAS = {"/v1/chat/completions": CHAT_REQUEST, "/v1/completions": COMPLETION_REQUEST,
           "/v1/embeddings": EMBEDDING_REQUEST}
HUGE = ["11111111111111111111", "1" * 5000, "-" + "9" * 30]


def _shape(body: Any) -> dict[str, Any]:
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "code", "param"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"] and "Error:" not in err["message"], err
    return dict(err)


async def _post(app: Any, path: str, data: bytes, ctype: str = "application/json", admin: bool = False) -> Any:
    headers = {**app.headers(admin=admin), "Content-Type": ctype}
    return await app.client.post(path, data=data, headers=headers)


def _raw(base: dict[str, Any], field: str, literal: str) -> bytes:
    """The base body with `field` set to a raw JSON literal (which json.dumps could not write)."""
    body = {k: v for k, v in base.items() if k != field}
    text = json.dumps(body)
    return (text[:-1] + f', "{field}": {literal}}}').encode()


async def test_huge_integers_in_every_field_are_400_naming_the_field(make_app, state_dir) -> None:
    app = await make_app()
    before = snapshot_tree(state_dir)
    seen = 0
    for path, schema in SCHEMAS.items():
        for field in [*schema["properties"], "messages"] if path.endswith("chat/completions") else schema["properties"]:
            for lit in HUGE:
                r = await _post(app, path, _raw(BASE[path], field, lit))
                err = _shape(await r.json())
                assert r.status == 400, (path, field, lit[:25], err)
                assert err["param"] == field, (path, field, err)
                seen += 1
    # admin bodies too
    for lit in HUGE:
        r = await _post(app, "/admin/bundles", f'{{"path": {lit}}}'.encode(), admin=True)
        assert r.status == 400 and _shape(await r.json())["param"] == "path"
    assert seen > 100
    assert snapshot_tree(state_dir) == before


@pytest.mark.parametrize("depth", [1000, 100_000])
async def test_deep_nesting_is_400(make_app, state_dir, depth) -> None:
    app = await make_app()
    before = snapshot_tree(state_dir)
    nested = "[" * depth + "]" * depth
    for path in SCHEMAS:
        r = await _post(app, path, _raw(BASE[path], "stop", nested))
        assert r.status == 400, path
        err = _shape(await r.json())
        assert "nested too deeply" in err["message"] and err["param"] == "stop", err
    r = await _post(app, "/admin/bundles", f'{{"path": {nested}}}'.encode(), admin=True)
    err = _shape(await r.json())
    assert r.status == 400 and "nested too deeply" in err["message"] and err["param"] == "path"
    r = await _post(app, "/admin/bundles", ("{\"path\": " + '{"a":' * depth + "1" + "}" * depth + "}").encode(),
                    admin=True)
    assert r.status == 400
    assert snapshot_tree(state_dir) == before


@pytest.mark.parametrize(("field", "literal"), [
    ("temperature", "NaN"), ("temperature", "Infinity"), ("temperature", "-Infinity"), ("top_p", "NaN"),
    ("top_p", "1e999"), ("max_tokens", "5.0"), ("max_tokens", "1e3"), ("max_tokens", "true"),
    ("seed", "1.5"), ("n", "2")])
async def test_non_finite_and_non_integer_numbers_are_400(make_app, field, literal) -> None:
    app = await make_app()
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = await _post(app, path, _raw(BASE[path], field, literal))
        assert r.status == 400, (path, field, literal)
        assert _shape(await r.json())["param"] == field


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
                                   "application/json; charset=latin-1", ""])
async def test_bodies_not_sent_as_json_are_415(make_app, state_dir, ctype) -> None:
    app = await make_app()
    before = snapshot_tree(state_dir)
    for path, base in BASE.items():
        headers = app.headers()
        if ctype:
            headers["Content-Type"] = ctype
        r = await app.client.post(path, data=json.dumps(base).encode(), headers=headers,
                                  skip_auto_headers=["Content-Type"])
        assert r.status == 415, (path, ctype, await r.text())
        assert _shape(await r.json())["code"] == "unsupported_media_type"
    r = await app.client.post("/admin/bundles", data=b'{"path": "/x"}',
                              headers={**app.headers(admin=True), "Content-Type": ctype or "text/plain"})
    assert r.status == 415
    assert snapshot_tree(state_dir) == before


def _non_neutral(field: str) -> Any:
    neutral = NOT_IMPLEMENTED[field][0]
    for v in ({"type": "json_object"}, [{"type": "function"}], "auto", {"50256": -100}, 0.5, 40, True, 3, "x"):
        if v not in neutral:
            return v
    raise AssertionError(field)


async def test_fields_that_would_change_the_output_are_refused_by_name(make_app, state_dir) -> None:
    app = await make_app()
    before = snapshot_tree(state_dir)
    checked = 0
    for path, schema in SCHEMAS.items():
        for field in NOT_IMPLEMENTED:
            if field not in schema["properties"]:
                continue
            r = await app.client.post(path, headers=app.headers(), json={**BASE[path], field: _non_neutral(field)})
            err = _shape(await r.json())
            assert r.status == 400 and err["param"] == field and err["code"] == "unsupported_field", (path, err)
            checked += 1
        r = await app.client.post(path, headers=app.headers(), json={**BASE[path], "frobnicate": 1})
        err = _shape(await r.json())
        assert r.status == 400 and err["param"] == "frobnicate" and err["code"] == "unknown_field"
    # an unknown key inside a message is named with its place
    r = await app.client.post("/v1/chat/completions", headers=app.headers(),
                              json={"model": "smollm2",
                                    "messages": [{"role": "user", "content": "x", "tool_calls": []}]})
    assert r.status == 400 and _shape(await r.json())["param"] == "messages[0].tool_calls"
    assert checked >= 20
    assert snapshot_tree(state_dir) == before


async def test_fields_that_cannot_change_the_output_pass_validation(make_app) -> None:
    app = await make_app()
    # an unknown model: validation passed when the answer is the model lookup's 404
    for path, base in BASE.items():
        extra = {k: "x" if k not in ("metadata", "store", "parallel_tool_calls") else
                 ({"a": "b"} if k == "metadata" else False) for k in ACCEPTED_IGNORED}
        neutral = {k: v[0][0] for k, v in NOT_IMPLEMENTED.items() if k in SCHEMAS[path]["properties"]}
        r = await app.client.post(path, headers=app.headers(), json={**base, **extra, **neutral, "model": "nope"})
        assert r.status == 404, (path, await r.text())


def test_readme_table_lists_every_refused_and_ignored_field() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| request field |"):]
    table = table[:table.index("\n\n")]
    refused = set(re.findall(r"^\| `(\w+)` \| refused", table, re.M))
    ignored = set(re.findall(r"^\| `(\w+)` \| accepted, ignored", table, re.M))
    assert refused == set(NOT_IMPLEMENTED)
    assert ignored == set(ACCEPTED_IGNORED)


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"model": "smollm2", "prompt": ""}, "prompt"),
    ("/v1/completions", {"model": "smollm2", "prompt": [""]}, "prompt"),
    ("/v1/completions", {"model": "smollm2", "prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"model": "smollm2", "prompt": ["\udfff"]}, "prompt[0]"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": "\ud800"}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "ok\udbff"}]}]}, "messages[0].content[0].text"),
    ("/v1/embeddings", {"model": "smollm2", "input": ["fine", "\ud800"]}, "input[1]"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": MSGS, "stop": ["\ud800"]}, "stop[0]"),
])
async def test_empty_prompt_and_lone_surrogates_are_400(make_app, state_dir, path, body, param) -> None:
    app = await make_app()
    before = snapshot_tree(state_dir)
    data = json.dumps(body).encode()  # ensure_ascii writes the lone surrogate as the escape \ud800
    r = await _post(app, path, data)
    err = _shape(await r.json())
    assert r.status == 400, err
    assert err["param"] is not None and err["param"].startswith(param.split("[")[0]), err
    assert snapshot_tree(state_dir) == before


def test_worker_failure_text_never_reaches_the_client() -> None:
    err = _worker_error(p.Error(id="j1", kind="internal", message="AssertionError: n_tokens <= n_batch"))
    assert "AssertionError" not in err.message and "n_batch" not in err.message  # type: ignore[attr-defined]
    assert err.code == "inference_failed"  # type: ignore[attr-defined]


async def test_127094_empty_messages_are_refused_fast_and_healthz_answers_meanwhile(make_app, state_dir) -> None:
    app = await make_app()
    before = snapshot_tree(state_dir)
    body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": ""}] * 127_094},
                      separators=(",", ":")).encode()
    assert len(body) < 4 * 1024 * 1024
    big = asyncio.ensure_future(_post(app, "/v1/chat/completions", body))
    gaps = await healthz_latencies(app, big.done)
    r = big.result()
    err = _shape(await r.json())
    assert r.status == 400 and err["param"] == "messages" and err["code"] == "too_many_messages", err
    assert gaps and max(gaps) < 1.0, gaps
    # characters: a prompt that cannot fit n_ctx (512 here) is refused before any tokenizing
    for path, field, value in (("/v1/completions", "prompt", "x" * 70_000),
                               ("/v1/chat/completions", "messages", [{"role": "user", "content": "y" * 400}] * 200)):
        r = await app.client.post(path, headers=app.headers(), json={"model": "smollm2", field: value})
        err = _shape(await r.json())
        assert r.status == 400 and err["code"] == "context_length_exceeded" and err["param"] == field, err
    assert snapshot_tree(state_dir) == before


async def test_disk_full_during_an_upload_is_507_in_the_error_shape(make_app, state_dir, monkeypatch) -> None:
    app = await make_app()
    before = snapshot_tree(state_dir)
    real_write = os.write
    writes = {"staging": 0}

    def full_disk(fd: int, data: Any) -> int:
        """The OS boundary: writes into the state dir's staging fail as a full disk does, after the first."""
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(state_dir / "staging")):
            writes["staging"] += 1
            if writes["staging"] > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    data = os.urandom(3 << 20)
    r = await app.client.post("/admin/bundles", data=data,
                              headers={**app.headers(admin=True), "Content-Type": "application/x-tar"})
    err = _shape(await r.json())
    assert r.status == 507 and err["code"] == "insufficient_space", err
    assert writes["staging"] > 1  # the upload really hit the full disk
    monkeypatch.undo()

    def no_temp(*a: Any, **k: Any) -> Any:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", no_temp)
    r = await app.client.post("/admin/bundles", data=b"x" * 1024,
                              headers={**app.headers(admin=True), "Content-Type": "application/x-tar"})
    err = _shape(await r.json())
    assert r.status == 500 and err["code"] == "internal_error" and "Permission" not in err["message"], err
    monkeypatch.undo()
    assert snapshot_tree(state_dir) == before
