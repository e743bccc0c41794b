"""The governor wired to the scheduler, in-process with real workers: faults at swap time.

Sensor readings are replayed (the one fake); everything else is real.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from hardware.governor import GovernorThresholds
from runtime.store import ModelStore

GiB = 1 << 30


def timeline(path: Path, points: list[tuple[float, float]], ram_available: int = 10 * GiB) -> str:
    path.write_text("".join(json.dumps({"t": t, "ram_total_bytes": 16 * GiB, "ram_available_bytes": ram_available,
                                        "cpu_temp_c": c}) + "\n" for t, c in points))
    return str(path)


async def hardware(app: Any) -> dict[str, Any]:
    return dict(await (await app.client.get("/admin/hardware", headers=app.headers(admin=True))).json())


async def wait_for(app: Any, pred: Any, timeout: float = 20) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            hw = await hardware(app)
            if pred(hw):
                return hw
            await asyncio.sleep(0.1)


async def status(app: Any) -> dict[str, Any]:
    return dict((await (await app.client.get("/admin/status", headers=app.headers(admin=True))).json())["models"][0])


async def two_variant_app(make_app: Any, state_dir: Path, tmp_path: Path, q4_0: Path, points: Any,
                          **kw: Any) -> tuple[Any, Any]:
    small = ModelStore(state_dir).add_file(q4_0, family="smollm2")
    app = await make_app(sensor_replay=timeline(tmp_path / "t.jsonl", points), governor_interval=0.1,
                         governor=GovernorThresholds(min_dwell_s=0.5), **kw)
    return app, small


async def chat_ok(app: Any) -> dict[str, Any]:
    r = await app.client.post("/v1/chat/completions", headers=app.headers(), json={
        "model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status == 200, await r.text()
    return dict(await r.json())


async def test_constrained_swaps_to_the_smaller_variant_and_limits_concurrency(
        make_app, state_dir, tmp_path, smollm2_q4_0_path) -> None:
    app, small = await two_variant_app(make_app, state_dir, tmp_path, smollm2_q4_0_path, [(0, 50), (1.5, 83)])
    assert (await chat_ok(app))["system_fingerprint"] != f"sha256-{small.digest[:16]}"
    hw = await wait_for(app, lambda h: h["swaps"]["smollm2"] and h["swaps"]["smollm2"][-1]["outcome"] == "ok")
    assert hw["governor"]["state"] == "constrained" and hw["concurrency_limit"] == 1
    assert "cpu" in hw["governor"]["reason"].lower()
    assert hw["decisions"]["smollm2"]["quantization"] == "Q4_0"
    assert (await chat_ok(app))["system_fingerprint"] == f"sha256-{small.digest[:16]}"


@pytest.mark.parametrize("damage", ["missing", "not-gguf"])
async def test_variant_missing_or_corrupt_at_swap_time_stays_on_current(
        make_app, state_dir, tmp_path, smollm2_q4_0_path, damage) -> None:
    # damage the blob as soon as the app has started (the store was inspected at bootstrap), not after the model
    # load: on a slow box the load can outlast the replay's 2 s and the swap would be decided before the damage
    app, small = await two_variant_app(make_app, state_dir, tmp_path, smollm2_q4_0_path, [(0, 50), (2, 83)],
                                       wait=False)
    blob = ModelStore(state_dir).blob_path(small.digest)
    if damage == "missing":
        blob.unlink()
    else:
        blob.write_bytes(b"\0" * blob.stat().st_size)
    await app.wait_ready()
    await wait_for(app, lambda h: h["governor"]["state"] == "constrained")
    # positive signal first: the swap decision ran and re-checked the blob (it marks the variant broken)...
    async with asyncio.timeout(20):
        while True:
            st = await status(app)
            if any(v["broken"] for v in st["variants"]):
                break
            await asyncio.sleep(0.05)
    # ...and only then the absence: it never tried to load it
    assert (await hardware(app))["swaps"]["smollm2"] == []
    assert st["quantization"] == "Q4_1" and st["state"] == "ready"
    broken = {v["quantization"]: v["broken"] for v in st["variants"]}
    assert broken["Q4_1"] is None
    assert ("missing" in broken["Q4_0"]) if damage == "missing" else ("not a GGUF file" in broken["Q4_0"])
    assert (await chat_ok(app))["usage"]["completion_tokens"] > 0


async def test_variant_that_fails_to_load_is_marked_broken_and_serving_continues(
        make_app, state_dir, tmp_path, smollm2_q4_0_path) -> None:
    # same size, a header we can read and plan, but a tokenizer llama.cpp does not know: only loading finds out
    bad = tmp_path / "bad.gguf"
    data = smollm2_q4_0_path.read_bytes()
    i = data.index(b"tokenizer.ggml.model")
    j = data.index(b"gpt2", i)
    bad.write_bytes(data[:j] + b"gpX2" + data[j + 4:])
    app, _ = await two_variant_app(make_app, state_dir, tmp_path, bad, [(0, 50), (1.5, 83)])
    hw = await wait_for(app, lambda h: h["swaps"]["smollm2"] and h["swaps"]["smollm2"][-1]["outcome"] != "pending")
    assert hw["swaps"]["smollm2"][-1]["outcome"].startswith("failed")
    st = (await (await app.client.get("/admin/status", headers=app.headers(admin=True))).json())["models"][0]
    assert st["quantization"] == "Q4_1" and st["state"] == "ready"
    assert any(v["broken"] and "failed to load" in v["broken"] for v in st["variants"])
    await chat_ok(app)


async def test_critical_refuses_with_retry_after_then_recovers(make_app, state_dir, tmp_path) -> None:
    app = await make_app(sensor_replay=timeline(tmp_path / "t.jsonl", [(0, 50), (1, 95), (3, 60)]),
                         governor_interval=0.1, governor=GovernorThresholds(min_dwell_s=0.5))
    await chat_ok(app)
    await wait_for(app, lambda h: h["governor"]["state"] == "critical")
    r = await app.client.post("/v1/chat/completions", headers=app.headers(), json={
        "model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
    err = (await r.json())["error"]
    assert err["code"] == "overloaded" and "critical" in err["message"]
    hw = await wait_for(app, lambda h: h["governor"]["state"] == "normal")
    assert [x["to"] for x in hw["governor"]["history"]] == ["critical", "constrained", "normal"]
    await chat_ok(app)


async def test_variant_whose_header_cannot_be_planned_is_marked_and_never_loaded(
        make_app, state_dir, tmp_path, smollm2_q4_0_path) -> None:
    # an architecture neither we nor llama.cpp know: the header parses, the memory estimate cannot be made
    bad = tmp_path / "xlama.gguf"
    data = smollm2_q4_0_path.read_bytes()
    j = data.index(b"llama", data.index(b"general.architecture"))
    bad.write_bytes(data[:j] + b"xlama" + data[j + 5:])
    app, _ = await two_variant_app(make_app, state_dir, tmp_path, bad, [(0, 50), (1, 83)])
    await wait_for(app, lambda h: h["governor"]["state"] == "constrained")
    st = (await (await app.client.get("/admin/status", headers=app.headers(admin=True))).json())["models"][0]
    assert st["quantization"] == "Q4_1" and st["state"] == "ready"
    assert any(v["broken"] and "cannot plan" in v["broken"] for v in st["variants"])
    assert (await hardware(app))["swaps"]["smollm2"] == []
    await chat_ok(app)


async def test_swap_without_room_for_both_stops_first_and_the_queue_holds_requests(
        make_app, state_dir, tmp_path, smollm2_q4_0_path) -> None:
    from daemon.governance import footprint

    store = ModelStore(state_dir)
    small = store.add_file(smollm2_q4_0_path, family="smollm2")
    fams = store.families()["smollm2"]
    big = next(v for v in fams if v.digest != small.digest)
    small = next(v for v in fams if v.digest == small.digest)
    # after t=1.5 less RAM is free than the smaller variant needs alone, so it cannot load beside the old one;
    # what the old one gives back makes it fit
    avail = footprint(small, 512) - (8 << 20)
    assert footprint(small, 512) < (avail + footprint(big, 512)) * 0.7
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"t": 0, "ram_total_bytes": 16 * GiB, "ram_available_bytes": 10 * GiB,
                                "cpu_temp_c": 50}) + "\n" +
                    json.dumps({"t": 1.5, "ram_total_bytes": 1 * GiB, "ram_available_bytes": avail,
                                "cpu_temp_c": 83}) + "\n")
    app = await make_app(sensor_replay=str(path), governor_interval=0.1, ram_headroom_mb=0,
                         governor=GovernorThresholds(min_dwell_s=0.5))

    async def one() -> tuple[int, str]:
        r = await app.client.post("/v1/chat/completions", headers=app.headers(), json={
            "model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        body = await r.json()
        return r.status, body.get("system_fingerprint", body)

    results = []
    async with asyncio.timeout(30):
        while True:
            results += await asyncio.gather(*(one() for _ in range(3)))
            hw = await hardware(app)
            if hw["swaps"]["smollm2"] and hw["swaps"]["smollm2"][-1]["outcome"] == "ok":
                break
    results += await asyncio.gather(*(one() for _ in range(3)))
    swap = hw["swaps"]["smollm2"][-1]
    assert swap["overlap"] is False and swap["to_digest"] == small.digest
    assert all(status == 200 for status, _ in results), results
    assert results[-1][1] == f"sha256-{small.digest[:16]}"
