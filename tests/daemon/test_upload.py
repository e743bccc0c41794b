"""Bundle uploads through the running daemon: hostile tars do not freeze it, uploads are
serialized before they are written (issue 7 item 12)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from tests.daemon.probes import healthz_latencies
from tests.daemon.test_updates import keyring, provisioned  # noqa: F401 - fixtures
from tests.sync.test_tar_hostile import HOSTILE

TAR = {"Content-Type": "application/x-tar"}


async def test_healthz_answers_during_hostile_uploads(make_app, provisioned: Path) -> None:  # noqa: F811
    app = await make_app()
    stop = asyncio.Event()
    poll = asyncio.create_task(healthz_latencies(app, stop.is_set))
    try:
        for case in ("pax-1MiB-digits", "pax-huge-header", "gnu-sparse", "gnu-longname", "too-many-members"):
            data, code = HOSTILE[case]
            r = await app.client.post("/admin/bundles", data=data, headers={**app.headers(admin=True), **TAR})
            body = await r.json()
            assert r.status == 400 and body["error"]["code"] == code, (case, body)
            assert "Traceback" not in str(body)
    finally:
        stop.set()
    latencies = await poll
    assert latencies and max(latencies) < 1.0, max(latencies)
    assert not list((provisioned / "staging").iterdir())
    status = await (await app.client.get("/admin/bundles", headers=app.headers(admin=True))).json()
    assert status["progress"]["phase"] == "failed" and status["last_error"]["code"] == "bad_tar_member"


async def test_second_upload_is_refused_before_it_is_written(make_app, provisioned: Path) -> None:  # noqa: F811
    app = await make_app()
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield HOSTILE["gnu-longname"][0][:512]
        await release.wait()
        yield HOSTILE["gnu-longname"][0][512:]

    first = asyncio.create_task(app.client.post("/admin/bundles", data=slow_body(),
                                                headers={**app.headers(admin=True), **TAR}))
    staging = provisioned / "staging"
    async with asyncio.timeout(10):
        while not any(p.name.startswith("upload-") for p in staging.iterdir()):
            await asyncio.sleep(0.02)
    r = await app.client.post("/admin/bundles", data=b"\0" * 4096, headers={**app.headers(admin=True), **TAR})
    assert r.status == 409 and (await r.json())["error"]["code"] == "import_in_progress"
    assert len([p for p in staging.iterdir() if p.name.startswith("upload-")]) == 1
    release.set()
    r1 = await first
    assert r1.status == 400 and (await r1.json())["error"]["code"] == "bad_tar"
    assert not list(staging.iterdir())


async def test_bundle_path_body_is_checked_against_the_documented_schema(make_app, provisioned: Path) -> None:  # noqa: F811
    """POST /admin/bundles with JSON accepts exactly what /openapi.json documents for it."""
    import jsonschema

    app = await make_app()
    doc = await (await app.client.get("/openapi.json", headers=app.headers())).json()
    schema = doc["paths"]["/admin/bundles"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator(schema)
    missing = str(provisioned.parent / "no-such-stick")
    for body in ({"path": 5}, {"path": ""}, {}, {"path": None}, {"path": ["x"]}, {"path": missing}):
        r = await app.client.post("/admin/bundles", json=body, headers=app.headers(admin=True))
        err = (await r.json())["error"]
        if validator.is_valid(body):
            assert err["code"] == "not_a_bundle", (body, err)
        else:
            assert r.status == 400 and err["code"] == "invalid_value", (body, err)
            assert "path" in err["message"], err
