"""Signed updates through the running daemon: admin API, USB stick, health check, policy, rollback.

Real Ed25519 keys, real bundles on disk, real models loaded in real workers.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import sqlite3
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.sync.helpers import POLICY, Keyring, make_bundle, snapshot, write_json

SEA_POLICY = POLICY.replace('allowed_families = ["tiny", "tiny2"]', 'allowed_families = ["sea", "smollm2", "bay"]') \
    .replace("max_tokens = 512", "max_tokens = 40")


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    kr = Keyring(tmp_path / "keys")
    kr.root_keys = kr.new_keys("root", 2)
    kr.bundle_keys = kr.new_keys("bundle", 2)
    return kr


@pytest.fixture
def provisioned(state_dir: Path, keyring: Keyring) -> Path:
    """The state dir (SmolLM2 added locally as 'smollm2') with a trust root installed."""
    write_json(state_dir / "trust" / "root.json", keyring.root_doc(1, keyring.root_keys, keyring.bundle_keys))
    return state_dir


def bundle(tmp_path: Path, kr: Keyring, name: str, seq: int, models: dict[str, list[Path]],
           policy: str = SEA_POLICY, **kw: Any) -> Path:
    return make_bundle(tmp_path / name, kr, seq, models, policy=policy, **kw)


async def models(app: Any) -> dict[str, str]:
    body = await (await app.client.get("/v1/models", headers=app.headers())).json()
    return {m["id"]: m["state"] for m in body["data"]}


async def wait_models(app: Any, want: dict[str, str], timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while await models(app) != want:
            await asyncio.sleep(0.1)


async def chat(app: Any, model: str, **kw: Any) -> Any:
    return await app.client.post("/v1/chat/completions", headers=app.headers(), json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], **kw})


async def post_path(app: Any, path: Path) -> Any:
    return await app.client.post("/admin/bundles", headers=app.headers(admin=True), json={"path": str(path)})


def audit_actions(state_dir: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(state_dir / "atoll.db") as c:
        return list(c.execute("SELECT principal, action, outcome FROM audit_chain ORDER BY seq"))


async def test_import_by_path_serves_the_new_model_and_applies_the_policy_live(
        make_app, provisioned, tmp_path, keyring, smollm2_path) -> None:
    app = await make_app()
    assert await models(app) == {"smollm2": "ready"}
    assert (await chat(app, "smollm2", max_tokens=100)).status == 200
    b = bundle(tmp_path, keyring, "b1", 1, {"sea": [smollm2_path]})
    r = await post_path(app, b)
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["status"] == "installed" and body["sequence"] == 1
    await wait_models(app, {"sea": "ready", "smollm2": "ready"})
    ok = await chat(app, "sea", max_tokens=5)
    assert ok.status == 200
    # the signed policy caps max_tokens at 40, without a restart
    r = await chat(app, "smollm2", max_tokens=100)
    assert r.status == 400 and (await r.json())["error"]["code"] == "policy_limit"
    st = await (await app.client.get("/admin/bundles", headers=app.headers(admin=True))).json()
    assert st["current"]["sequence"] == 1 and st["progress"]["phase"] == "done"
    actions = [a for _, a, _ in audit_actions(provisioned)]
    assert "bundle.import_path" in actions and "sync.import.installed" in actions
    # the same bundle again: nothing to do
    again = await (await post_path(app, b)).json()
    assert again["status"] == "already_installed"


async def test_import_by_tar_upload(make_app, provisioned, tmp_path, keyring, smollm2_path) -> None:
    app = await make_app()
    b = bundle(tmp_path, keyring, "b1", 1, {"sea": [smollm2_path]})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        tf.add(b / "ATOLL", arcname="ATOLL")
    r = await app.client.post("/admin/bundles", data=buf.getvalue(),
                              headers={**app.headers(admin=True), "Content-Type": "application/x-tar"})
    assert r.status == 200, await r.text()
    await wait_models(app, {"sea": "ready", "smollm2": "ready"})
    assert not any(p.name.startswith("upload-") for p in (provisioned / "staging").iterdir())


@pytest.mark.parametrize("damage", ["unsigned", "bad-signature", "blob-mismatch", "older-sequence"])
async def test_bad_bundle_is_refused_and_changes_nothing(make_app, provisioned, tmp_path, keyring, smollm2_path,
                                                         damage) -> None:
    app = await make_app()
    if damage == "older-sequence":
        assert (await post_path(app, bundle(tmp_path, keyring, "b5", 5, {"sea": [smollm2_path]}))).status == 200
        await wait_models(app, {"sea": "ready", "smollm2": "ready"})
        b = bundle(tmp_path, keyring, "b3", 3, {"bay": [smollm2_path]})
    else:
        b = bundle(tmp_path, keyring, "b1", 1, {"bay": [smollm2_path]}, signers=[] if damage == "unsigned" else None)
    if damage == "bad-signature":
        sigs = b / "ATOLL" / "bundle.json.sigs"
        sigs.write_text(sigs.read_text().replace('"sig": "', '"sig": "AAAA', 1))
    if damage == "blob-mismatch":
        blob = next((b / "ATOLL" / "blobs").iterdir())
        data = bytearray(blob.read_bytes())
        data[-1] ^= 0xFF
        blob.unlink()
        blob.write_bytes(bytes(data))
    before_models = await models(app)
    before = snapshot(provisioned / "blobs"), snapshot(provisioned / "releases") \
        if (provisioned / "releases").exists() else None
    r = await post_path(app, b)
    assert r.status in (400, 422), await r.text()
    err = (await r.json())["error"]
    assert err["code"] and err["message"]
    assert (snapshot(provisioned / "blobs"), snapshot(provisioned / "releases")
            if (provisioned / "releases").exists() else None) == before
    assert await models(app) == before_models
    st = await (await app.client.get("/admin/bundles", headers=app.headers(admin=True))).json()
    assert st["last_error"]["code"] == err["code"]
    assert (await chat(app, "smollm2", max_tokens=3)).status == 200


async def test_model_that_fails_its_smoke_test_rolls_back(make_app, provisioned, tmp_path, keyring,
                                                          smollm2_path) -> None:
    # valid header, but a tokenizer llama.cpp does not know: only loading it in a worker finds out
    bad = tmp_path / "bad.gguf"
    data = smollm2_path.read_bytes()
    j = data.index(b"gpt2", data.index(b"tokenizer.ggml.model"))
    bad.write_bytes(data[:j] + b"gpX2" + data[j + 4:])
    app = await make_app()
    assert (await post_path(app, bundle(tmp_path, keyring, "b1", 1, {"sea": [smollm2_path]}))).status == 200
    await wait_models(app, {"sea": "ready", "smollm2": "ready"})
    r = await post_path(app, bundle(tmp_path, keyring, "b2", 2, {"bay": [bad]}))
    assert r.status == 422
    assert (await r.json())["error"]["code"] == "health_check_failed"
    st = await (await app.client.get("/admin/bundles", headers=app.headers(admin=True))).json()
    assert st["current"]["sequence"] == 1
    assert await models(app) == {"sea": "ready", "smollm2": "ready"}
    assert (await chat(app, "sea", max_tokens=3)).status == 200


async def test_policy_that_forbids_a_family_stops_serving_it_and_rollback_restores(
        make_app, provisioned, tmp_path, keyring, smollm2_path) -> None:
    app = await make_app()
    assert (await post_path(app, bundle(tmp_path, keyring, "b1", 1, {"sea": [smollm2_path]}))).status == 200
    await wait_models(app, {"sea": "ready", "smollm2": "ready"})
    only_bay = SEA_POLICY.replace('["sea", "smollm2", "bay"]', '["bay"]')
    assert (await post_path(app, bundle(tmp_path, keyring, "b2", 2, {"bay": [smollm2_path]},
                                        policy=only_bay))).status == 200
    await wait_models(app, {"bay": "ready"})
    assert (await chat(app, "smollm2", max_tokens=3)).status == 404
    r = await app.client.post("/admin/rollback", headers=app.headers(admin=True))
    assert r.status == 200 and (await r.json())["current"]["sequence"] == 1
    await wait_models(app, {"sea": "ready", "smollm2": "ready"})
    assert (await app.client.post("/admin/rollback", headers=app.headers())).status == 403


async def test_usb_stick_with_a_bundle_is_imported_and_served(make_app, provisioned, tmp_path, keyring,
                                                              smollm2_path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    app = await make_app(usb_watch=True, media_dirs=str(media))
    b = bundle(tmp_path, keyring, "b1", 1, {"sea": [smollm2_path]})
    shutil.copytree(b, media / "STICK")  # the stick is mounted
    await wait_models(app, {"sea": "ready", "smollm2": "ready"}, timeout=60)
    assert any(a == "sync.import.installed" for _, a, _ in audit_actions(provisioned))


async def test_every_policy_field_is_put_in_force(make_app, provisioned, tmp_path, keyring, smollm2_path) -> None:
    from daemon.services import SERVICES

    policy = (SEA_POLICY.replace("max_context = 4096", "max_context = 256")
              .replace("queue_size = 8", "queue_size = 3")
              .replace("constrained_c = 80.0", "constrained_c = 60.0").replace("critical_c = 90.0", "critical_c = 70.0")
              .replace("log_prompts = false", "log_prompts = true")
              .replace("prompt_retention_days = 0", "prompt_retention_days = 2"))
    app = await make_app()
    services = app.app[SERVICES]
    assert (await post_path(app, bundle(tmp_path, keyring, "b1", 1, {"sea": [smollm2_path]}, policy=policy))).status \
        == 200
    async with asyncio.timeout(30):
        while True:
            body = await (await app.client.get("/v1/models", headers=app.headers())).json()
            ctx = {m["id"]: (m["state"], m["n_ctx"]) for m in body["data"]}
            if ctx == {"sea": ("ready", 256), "smollm2": ("ready", 256)}:  # max_context caps both, live
                break
            await asyncio.sleep(0.1)
    th = services.hardware.governor.machine.thresholds
    assert (th.cpu_constrained_c, th.cpu_critical_c, th.gpu_constrained_c, th.gpu_critical_c) == (60, 70, 60, 70)
    assert 0 < th.ram_critical_available_pct < th.ram_constrained_available_pct
    assert services.scheduler.config.queue_size == 3
    assert services.limits.prompt_retention_days == 2
    # prompt text is now logged...
    assert (await chat(app, "sea", max_tokens=3)).status == 200
    async with asyncio.timeout(10):
        while not (rows := (await (await app.client.get("/admin/usage", headers=app.headers(admin=True))).json())
                   ["data"]) or rows[0]["endpoint"] != "chat":
            await asyncio.sleep(0.05)
    assert rows[0]["prompt_text"] and '"hi"' in rows[0]["prompt_text"] and rows[0]["completion_text"] is not None
    # ...and blanked once older than the retention
    future = "9999-01-01T00:00:00+00:00"
    assert await services.db.run(services.db.purge_prompt_text, future) >= 1
    row = (await (await app.client.get("/admin/usage", headers=app.headers(admin=True))).json())["data"][0]
    assert row["prompt_text"] is None and row["completion_text"] is None and row["completion_tokens"] > 0
