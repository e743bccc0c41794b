"""The daemon <-> worker protocol: typed messages round-trip, bad lines are refused."""

from __future__ import annotations

import json

import pytest

from runtime import protocol as p

MESSAGES: list[p.Request | p.Event] = [
    p.Generate(prompt="Once upon", max_tokens=4, temperature=0.0, stop=["\n"], seed=7, id="j1", timeout=2.5),
    p.Generate(messages=[p.Message("system", "be brief"), p.Message("user", "hi")], id="j2"),
    p.Embed(input=["a", "b"], id="j3", timeout=None),
    p.Cancel(id="j1"), p.StatsQuery(id="s1"),
    p.Ready(n_ctx=512, chat=True, embedding=False, load_seconds=0.2, pid=42),
    p.Start(id="j1", prompt_tokens=3), p.Text(id="j1", text="héllo ✓"),
    p.Done(id="j1", finish_reason="length", prompt_tokens=3, completion_tokens=4),
    p.Embedding(id="j3", data=[[0.5, -1.0]], prompt_tokens=2),
    p.Error(id="j1", kind="bad_request", message="prompt is empty", param="prompt"),
    p.Stats(id="s1", requests=3, prompts=2, prompt_tokens=40),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_as_one_json_line(msg: p.Request | p.Event) -> None:
    line = p.encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    decode = p.decode_request if isinstance(msg, p.Generate | p.Embed | p.Cancel | p.StatsQuery) else p.decode_event
    assert decode(line) == msg


def test_client_text_with_a_lone_surrogate_reaches_the_worker_intact() -> None:
    """The worker must see the surrogate (and refuse it naming the field); encoding must not fail first."""
    req = p.Generate(prompt="a\ud800b", id="x")
    assert p.decode_request(p.encode(req)) == req


@pytest.mark.parametrize("line", [
    b"not json", b"[1, 2]", b'{"op": "launch", "id": "x"}', b'{"id": "x"}',
    b'{"op": "generate", "id": "x", "max_tokens": true}',  # a bool is not an int
    b'{"op": "generate", "id": "x", "max_tokens": 1.5}',
    b'{"op": "generate", "id": 7}',
    b'{"op": "generate", "id": "x", "messages": [{"role": "user"}]}',
    b'{"op": "generate", "id": "x", "messages": [{"role": "user", "content": 3}]}',
    b'{"op": "generate", "id": "x", "stop": "\\n"}',
    b'{"op": "generate", "id": "x", "rogue": 1}',
    b'{"op": "cancel"}',
])
def test_bad_request_lines_are_refused(line: bytes) -> None:
    with pytest.raises(p.ProtocolError):
        p.decode_request(line)


@pytest.mark.parametrize("obj", [
    {"ev": "text", "id": "x"}, {"ev": "text", "id": "x", "text": 5},
    {"ev": "error", "id": "x", "kind": "whatever", "message": "m"},
    {"ev": "done", "id": "x", "finish_reason": "stop", "prompt_tokens": "3", "completion_tokens": 1},
    {"ev": "crash", "returncode": 1},  # made by the daemon only, never accepted from a worker
    {"ev": "ready", "n_ctx": 512, "chat": 1, "embedding": False, "load_seconds": 0.1, "pid": 1},
])
def test_bad_event_lines_are_refused(obj: dict[str, object]) -> None:
    with pytest.raises(p.ProtocolError):
        p.decode_event(json.dumps(obj))
