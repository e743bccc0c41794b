"""The OpenAI-compatible API over the real app, real worker processes and the real SmolLM2 model."""

from __future__ import annotations

import json
from typing import Any

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}]}


async def chat(app: Any, **body: Any) -> Any:
    return await app.client.post("/v1/chat/completions", json={**CHAT, **body}, headers=app.headers())


def sse_events(raw: str) -> list[Any]:
    out = []
    for block in raw.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_chat_non_stream_matches_direct_llama(make_app, direct_llama) -> None:
    app = await make_app()
    r = await chat(app, max_tokens=20, temperature=0)
    assert r.status == 200
    body = await r.json()
    direct = direct_llama.create_chat_completion(messages=CHAT["messages"], max_tokens=20, temperature=0)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant",
                                             "content": direct["choices"][0]["message"]["content"]}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == direct["usage"]


async def test_chat_stream_concatenates_to_the_non_stream_answer(make_app) -> None:
    app = await make_app()
    whole = await (await chat(app, max_tokens=24, temperature=0)).json()
    r = await chat(app, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True})
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(await r.text())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == whole["usage"]


async def test_completions_and_usage_counts(make_app, direct_llama) -> None:
    app = await make_app()
    prompt = "The capital of France is"
    r = await app.client.post("/v1/completions", headers=app.headers(),
                              json={"model": "smollm2", "prompt": prompt, "max_tokens": 12, "temperature": 0})
    body = await r.json()
    direct = direct_llama.create_completion(prompt, max_tokens=12, temperature=0)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == direct["choices"][0]["text"]
    assert body["usage"]["prompt_tokens"] == len(direct_llama.tokenize(prompt.encode()))
    assert body["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"]


async def test_default_max_tokens_for_completions_is_openais_16(make_app) -> None:
    app = await make_app()
    r = await app.client.post("/v1/completions", headers=app.headers(),
                              json={"model": "smollm2", "prompt": "Once upon a time", "temperature": 0})
    body = await r.json()
    assert body["usage"]["completion_tokens"] <= 16
    assert body["choices"][0]["finish_reason"] in ("length", "stop")


async def test_stop_is_honoured(make_app) -> None:
    app = await make_app()
    free = await (await app.client.post("/v1/completions", headers=app.headers(), json={
        "model": "smollm2", "prompt": "Count: 1, 2, 3,", "max_tokens": 20, "temperature": 0})).json()
    text = free["choices"][0]["text"]
    assert "5" in text, text
    stopped = await (await app.client.post("/v1/completions", headers=app.headers(), json={
        "model": "smollm2", "prompt": "Count: 1, 2, 3,", "max_tokens": 20, "temperature": 0,
        "stop": ["5"]})).json()
    assert stopped["choices"][0]["text"] == text[: text.index("5")]
    assert stopped["choices"][0]["finish_reason"] == "stop"


async def test_seed_makes_sampling_repeatable(make_app) -> None:
    app = await make_app()

    async def sample(seed: int) -> str:
        r = await chat(app, max_tokens=16, temperature=1.0, top_p=0.95, seed=seed)
        return str((await r.json())["choices"][0]["message"]["content"])

    a, b = await sample(1234), await sample(1234)
    assert a == b
    others = {await sample(s) for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds should not all give the same sample"


async def test_temperature_zero_is_greedy_and_top_p_accepted(make_app) -> None:
    app = await make_app()
    outs = {str((await (await chat(app, max_tokens=10, temperature=0, top_p=p)).json())
                ["choices"][0]["message"]["content"]) for p in (0.1, 1.0)}
    assert len(outs) == 1


async def test_models_lists_state(make_app) -> None:
    app = await make_app()
    body = await (await app.client.get("/v1/models", headers=app.headers())).json()
    assert body["object"] == "list"
    (m,) = body["data"]
    assert m["id"] == "smollm2" and m["state"] == "ready" and m["quantization"] == "Q4_1" and m["n_ctx"] == 512


async def test_embeddings_on_a_generation_model_is_a_clear_400(make_app) -> None:
    app = await make_app()
    r = await app.client.post("/v1/embeddings", headers=app.headers(), json={"model": "smollm2", "input": "hi"})
    assert r.status == 400
    err = (await r.json())["error"]
    assert err["code"] == "embeddings_not_supported" and "smollm2" in err["message"]


async def test_embeddings_from_an_embedding_family(make_app, state_dir, smollm2_path) -> None:
    from runtime.store import ModelStore

    ModelStore(state_dir).add_file(smollm2_path, family="smol-embed", task="embed")
    app = await make_app()
    r = await app.client.post("/v1/embeddings", headers=app.headers(),
                              json={"model": "smol-embed", "input": ["the sea", "the sea", "a spreadsheet"]})
    assert r.status == 200, await r.text()
    body = await r.json()
    vecs = [d["embedding"] for d in body["data"]]
    assert len(vecs) == 3 and all(len(v) == 576 for v in vecs)
    norm = sum(x * x for x in vecs[0]) ** 0.5
    assert abs(norm - 1) < 1e-3
    assert vecs[0] == vecs[1] and vecs[0] != vecs[2]
    assert body["usage"]["prompt_tokens"] > 0
    r = await chat(app, model="smol-embed", max_tokens=5)
    assert r.status == 400


async def test_readyz_and_healthz_are_public(make_app) -> None:
    app = await make_app()
    assert (await app.client.get("/healthz")).status == 200
    r = await app.client.get("/readyz")
    assert r.status == 200 and (await r.json())["models"] == {"smollm2": "ready"}


async def test_readyz_is_503_while_loading(make_app) -> None:
    app = await make_app(wait=False)
    first = await app.client.get("/readyz")
    assert first.status == 503
    assert (await first.json())["models"]["smollm2"] in ("loading", "ready")
    await app.wait_ready()


async def test_usage_is_recorded_without_text(make_app) -> None:
    app = await make_app()
    await chat(app, max_tokens=5, temperature=0)
    r = await app.client.get("/admin/usage", headers=app.headers(admin=True))
    rows = (await r.json())["data"]
    row = rows[0]
    assert row["principal"] == "tester" and row["model"] == "smollm2" and row["status"] == "ok"
    assert row["completion_tokens"] == 5 and row["prompt_tokens"] == 37
    assert len(row["digest"]) == 64 and row["latency_ms"] > 0 and row["ttft_ms"] > 0
    assert row["prompt_text"] is None and row["completion_text"] is None


async def test_prompt_text_logged_only_when_enabled(make_app) -> None:
    app = await make_app(log_prompts=True)
    await chat(app, max_tokens=3, temperature=0)
    row = (await (await app.client.get("/admin/usage", headers=app.headers(admin=True))).json())["data"][0]
    assert "capital of France" in row["prompt_text"] and row["completion_text"]


async def test_admin_status(make_app) -> None:
    app = await make_app()
    st = await (await app.client.get("/admin/status", headers=app.headers(admin=True))).json()
    assert st["ready"] is True
    (m,) = st["models"]
    assert m["model"] == "smollm2" and m["state"] == "ready" and m["worker_pid"] > 0
