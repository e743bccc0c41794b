"""Fuzzing the request edge with hypothesis: hostile numbers, strings, nesting, fields and media
types, first straight into the body checker (thousands of cases), then through the real app over
HTTP. Outcomes are counted and printed; a 5xx or an error outside the documented shape fails."""

from __future__ import annotations

import collections
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.bodies import check_and_validate
from daemon.schemas import ACCEPTED_IGNORED, CHAT_REQUEST, COMPLETION_REQUEST, EMBEDDING_REQUEST, NOT_IMPLEMENTED
from runtime.errors import BadRequest

SCHEMAS = {"/v1/chat/completions": CHAT_REQUEST, "/v1/completions": COMPLETION_REQUEST,
           "/v1/embeddings": EMBEDDING_REQUEST}
FIELDS = sorted({f for s in SCHEMAS.values() for f in s["properties"]} | set(NOT_IMPLEMENTED) | set(ACCEPTED_IGNORED)
                | {"messages", "prompt", "input", "frobnicate"})
HOSTILE_LITERALS = ["NaN", "Infinity", "-Infinity", "1e999", "11111111111111111111", "1" * 5000, "-0", "5.0",
                    "[" * 1000 + "]" * 1000, '"\\ud800"', '"\\udfff x"', '""', "true", "null", "{}", "[]"]

texts = st.one_of(st.text(max_size=40), st.sampled_from(["\ud800", "a\udfffb", "", "<|im_start|>", "\x00"]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), texts)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(texts, inner, max_size=4)), max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot"]),
                                           "content": st.one_of(texts, values)}), max_size=4)
fields = st.dictionaries(st.sampled_from(FIELDS), values, max_size=5)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """A path and a body: a plausible request with hostile fields, sometimes a raw literal spliced in."""
    path = draw(st.sampled_from(sorted(SCHEMAS)))
    body: dict[str, Any] = {"model": draw(st.one_of(st.just("nope"), st.just("smollm2"), values))}
    if path.endswith("chat/completions"):
        body["messages"] = draw(st.one_of(messages, values))
    elif path.endswith("/completions"):
        body["prompt"] = draw(st.one_of(texts, values))
    else:
        body["input"] = draw(st.one_of(texts, st.lists(texts, max_size=3), values))
    body.update(draw(fields))
    raw = json.dumps(body)
    if draw(st.booleans()):
        field = draw(st.sampled_from(FIELDS))
        raw = raw[:-1] + f', "{field}": {draw(st.sampled_from(HOSTILE_LITERALS))}}}'
    if draw(st.integers(0, 9)) == 0:
        raw = raw[:draw(st.integers(0, len(raw)))]
    return path, raw.encode("utf-8", "surrogatepass")


def _precheck(body: dict[str, Any]) -> None:
    """The same work bound the daemon applies (n_ctx 512, 128 characters per token)."""
    msgs = body.get("messages")
    if isinstance(msgs, list) and len(msgs) > 512:
        raise BadRequest("too many", param="messages")


@settings(max_examples=3000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(case=bodies())
def test_the_body_checker_only_ever_refuses_with_a_bad_request(case: tuple[str, bytes]) -> None:
    path, raw = case
    try:
        body = check_and_validate(raw, SCHEMAS[path], _precheck)
    except BadRequest as e:
        assert e.status == 400 and e.message and "Traceback" not in e.message
        json.dumps({"error": {"message": e.message, "param": e.param}})  # always serializable
        return
    json.dumps(body)  # an accepted body holds nothing the rest of the daemon cannot handle


async def test_fuzz_the_api_over_http_no_5xx(make_app) -> None:
    app = await make_app()
    cases: list[tuple[str, bytes, str]] = []

    @settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=bodies(), ctype=st.sampled_from(["application/json"] * 8 + ["text/plain", "multipart/form-data"]))
    def collect(case: tuple[str, bytes], ctype: str) -> None:
        cases.append((case[0], case[1], ctype))

    collect()
    outcomes: collections.Counter[tuple[int, str]] = collections.Counter()
    server_errors = []
    for path, raw, ctype in cases:
        r = await app.client.post(path, data=raw, headers={**app.headers(), "Content-Type": ctype})
        body = await r.json()
        if r.status == 200:
            outcomes[(200, "ok")] += 1
            continue
        err = body["error"]
        assert {"message", "type", "code", "param"} <= set(err), body
        assert "Traceback" not in err["message"] and "Error: " not in err["message"], err
        outcomes[(r.status, err["code"])] += 1
        if r.status >= 500:
            server_errors.append((path, raw[:200], ctype, body))
    summary = ", ".join(f"{s} {c}: {n}" for (s, c), n in sorted(outcomes.items()))
    print(f"\nfuzzed {len(cases)} HTTP requests: {summary}; 5xx: {len(server_errors)}")
    assert (await app.client.get("/healthz")).status == 200
    assert not server_errors, server_errors[:3]
