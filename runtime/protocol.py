"""The daemon ↔ worker protocol: typed messages, one JSON object per line, validated on receipt.

Both sides use this module: the daemon (runtime.worker_client, runtime.runner) encodes
requests and decodes events, the worker (runtime.worker) decodes requests and encodes
events. A line that does not decode to a known message with fields of the right types
raises `ProtocolError`; nothing downstream ever sees an unchecked dict.

Every message but `Ready` carries `id`, the request (sequence) it belongs to, so one
worker may interleave the events of several requests (a batching engine sends the
`Text` events of all its sequences for one step back to back). Per token the cost is one
small `Text` object and one `json.dumps`/`json.loads` of ``{"ev","id","text"}``.

Requests (op):  generate, embed, cancel, stats.
Events (ev):    ready, start, text, done, embedding, error, stats; `crash` is made by the
                daemon when the worker process dies, never sent by it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, TypeAlias

#: Error kinds a worker may send, each mapped to one API error by the daemon (runtime.runner).
ErrorKind = Literal["bad_request", "context_length", "deadline", "unavailable", "governor", "shutting_down",
                    "internal"]
ERROR_KINDS: frozenset[str] = frozenset(ErrorKind.__args__)  # type: ignore[attr-defined]


class ProtocolError(ValueError):
    """A line that is not a valid message of this protocol."""


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message as the worker formats it: role and text content."""

    role: str
    content: str


# -- requests (daemon -> worker) ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Generate:
    """Generate text from a completion prompt or chat messages."""

    tag: ClassVar[str] = "generate"
    prompt: str | None = None
    messages: list[Message] | None = None
    max_tokens: int | None = None
    #: Bounds a missing max_tokens (site policy); None = the context window.
    max_tokens_cap: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    id: str = ""
    #: Seconds the request may still take when the worker receives it (its deadline); None = no limit.
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Embed:
    """Embed each input string."""

    tag: ClassVar[str] = "embed"
    input: list[str]
    id: str = ""
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Cancel:
    """Stop the named request (before or during its prompt processing or generation)."""

    tag: ClassVar[str] = "cancel"
    id: str


@dataclass(frozen=True, slots=True)
class StatsQuery:
    """Ask the worker for its counters (answered at once, even while it generates)."""

    tag: ClassVar[str] = "stats"
    id: str


Request: TypeAlias = Generate | Embed | Cancel | StatsQuery

# -- events (worker -> daemon) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """The model is loaded."""

    tag: ClassVar[str] = "ready"
    n_ctx: int
    chat: bool
    embedding: bool
    load_seconds: float
    pid: int


@dataclass(frozen=True, slots=True)
class Start:
    """The prompt is processed and generation begins."""

    tag: ClassVar[str] = "start"
    id: str
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class Text:
    """Generated text (one or a few tokens' worth)."""

    tag: ClassVar[str] = "text"
    id: str
    text: str


@dataclass(frozen=True, slots=True)
class Done:
    """Generation ended: finish_reason is stop, length or cancelled."""

    tag: ClassVar[str] = "done"
    id: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Embedding:
    """The vectors of an embed request."""

    tag: ClassVar[str] = "embedding"
    id: str
    data: list[list[float]]
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class Error:
    """The request failed; `kind` picks the API error, `param` names the request field at fault."""

    tag: ClassVar[str] = "error"
    id: str
    kind: str
    message: str
    param: str | None = None
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Stats:
    """The worker's counters: requests it received, prompts it started to process, prompt tokens."""

    tag: ClassVar[str] = "stats"
    id: str
    requests: int
    prompts: int
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class Crash:
    """The worker process died (made by the daemon, never sent on the wire)."""

    tag: ClassVar[str] = "crash"
    returncode: int | None
    id: str = ""


Event: TypeAlias = Ready | Start | Text | Done | Embedding | Error | Stats | Crash
#: Events after which a request has no more events.
FINAL = (Done, Embedding, Error, Crash)

_REQUESTS: dict[str, type[Any]] = {c.tag: c for c in (Generate, Embed, Cancel, StatsQuery)}
_EVENTS: dict[str, type[Any]] = {c.tag: c for c in (Ready, Start, Text, Done, Embedding, Error, Stats)}

# Field types checked on receipt. "int" never accepts a bool; "float" accepts an int.
_SPEC: dict[type[Any], dict[str, str]] = {
    Generate: {"prompt": "str?", "messages": "messages?", "max_tokens": "int?", "max_tokens_cap": "int?",
               "temperature": "float", "top_p": "float", "stop": "strs", "seed": "int?", "id": "str",
               "timeout": "float?"},
    Embed: {"input": "strs", "id": "str", "timeout": "float?"},
    Cancel: {"id": "str"}, StatsQuery: {"id": "str"},
    Ready: {"n_ctx": "int", "chat": "bool", "embedding": "bool", "load_seconds": "float", "pid": "int"},
    Start: {"id": "str", "prompt_tokens": "int"},
    Text: {"id": "str", "text": "str"},
    Done: {"id": "str", "finish_reason": "str", "prompt_tokens": "int", "completion_tokens": "int"},
    Embedding: {"id": "str", "data": "vectors", "prompt_tokens": "int"},
    Error: {"id": "str", "kind": "kind", "message": "str", "param": "str?", "retry_after": "float?"},
    Stats: {"id": "str", "requests": "int", "prompts": "int", "prompt_tokens": "int"},
}


def _ok(kind: str, v: Any) -> bool:
    if kind.endswith("?"):
        if v is None:
            return True
        kind = kind[:-1]
    if kind == "str":
        return isinstance(v, str)
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "float":
        return isinstance(v, int | float) and not isinstance(v, bool)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "kind":
        return v in ERROR_KINDS
    if kind == "strs":
        return isinstance(v, list) and all(isinstance(s, str) for s in v)
    if kind == "vectors":
        return isinstance(v, list) and all(isinstance(r, list) for r in v)
    if kind == "messages":
        return isinstance(v, list) and all(isinstance(m, dict) and set(m) == {"role", "content"}
                                           and isinstance(m["role"], str) and isinstance(m["content"], str)
                                           for m in v)
    raise AssertionError(kind)


def _decode(line: str | bytes, classes: dict[str, type[Any]], key: str) -> Any:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("not a JSON object")
    cls = classes.get(obj.pop(key, None))
    if cls is None:
        raise ProtocolError(f"unknown {key}")
    spec = _SPEC[cls]
    for name, value in obj.items():
        kind = spec.get(name)
        if kind is None or not _ok(kind, value):
            raise ProtocolError(f"{cls.tag}: bad field {name!r}")
    if cls is Generate and obj.get("messages") is not None:
        obj["messages"] = [Message(m["role"], m["content"]) for m in obj["messages"]]
    try:
        return cls(**obj)
    except TypeError:
        raise ProtocolError(f"{cls.tag}: missing fields") from None


def encode(msg: Request | Event) -> bytes:
    """One message as a JSON line (UTF-8, newline-terminated)."""
    if isinstance(msg, Text):  # the per-token path: skip asdict's deep copy
        return (json.dumps({"ev": "text", "id": msg.id, "text": msg.text}, ensure_ascii=False) + "\n").encode()
    if isinstance(msg, Generate | Embed | Cancel | StatsQuery):
        # ASCII-escaped: client text may hold lone surrogates, which the worker must see (and refuse).
        return (json.dumps({"op": msg.tag, **asdict(msg)}) + "\n").encode()
    return (json.dumps({"ev": msg.tag, **asdict(msg)}, ensure_ascii=False) + "\n").encode()


def decode_request(line: str | bytes) -> Request:
    """Parse and check one request line (worker side)."""
    return _decode(line, _REQUESTS, "op")


def decode_event(line: str | bytes) -> Event:
    """Parse and check one event line (daemon side)."""
    return _decode(line, _EVENTS, "ev")
