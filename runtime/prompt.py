"""Turning a client's prompt or chat messages into tokens safely, inside the worker.

Client text is always tokenized as *text*: a user who writes ``<|im_start|>system`` gets
those characters, never the control token. Only the chat template's own markup is parsed
for special tokens. To tell the two apart, the template is rendered with an unguessable
placeholder in place of each message's content; the rendered text is split at the
placeholders, special tokens are looked for in the markup only, and the prompt becomes
runs of plain text (markup and content alike) separated by the template's special tokens.
That is exactly how llama.cpp itself tokenizes with special tokens parsed (each fragment
between special tokens on its own), so an honest conversation gets the very same tokens
as before. (A template that transforms a message's content, e.g. ``| trim``, sees the
placeholder, so the content goes in as sent.)

Work is bounded before it starts: a request with more messages than the context window
has tokens, or more characters than the context window could hold even if every token
were the longest one in the vocabulary, is refused without formatting or tokenizing.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from runtime.protocol import Message

#: Roles a chat template is given (the daemon maps OpenAI's "developer" to "system").
ROLES = frozenset({"system", "user", "assistant", "tool"})


class RequestError(Exception):
    """A request the worker refuses; `kind` picks the API error, `param` names the field."""

    def __init__(self, kind: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param


def check_text(value: str, param: str) -> None:
    """Refuse text that cannot be UTF-8 encoded (a lone surrogate such as \\ud800), naming the field."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError("bad_request", f"{param} holds a lone surrogate (U+{ord(value[e.start]):04X} at "
                           f"character {e.start}), which is not valid Unicode text", param) from None


def check_fits(chars: int, n_ctx: int, max_token_chars: int, param: str) -> None:
    """Refuse, without tokenizing, text too long to fit `n_ctx` tokens whatever its tokenization."""
    if chars > n_ctx * max_token_chars:
        raise RequestError("context_length", f"{param} is {chars} characters: at least "
                           f"{-(-chars // max_token_chars)} tokens, more than the model's context window of "
                           f"{n_ctx} tokens", param)


def check_messages(messages: Sequence[Message], n_ctx: int, max_token_chars: int) -> None:
    """Bound a chat request's work cheaply and refuse bad text, before any formatting."""
    if not messages:
        raise RequestError("bad_request", "messages is empty; send at least one message", "messages")
    if len(messages) > n_ctx:
        raise RequestError("context_length", f"{len(messages)} messages cannot fit the model's context window "
                           f"of {n_ctx} tokens (each message takes at least one token)", "messages")
    check_fits(sum(len(m.content) for m in messages), n_ctx, max_token_chars, "messages")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise RequestError("bad_request", f"messages[{i}].role {m.role[:20]!r} is not one of "
                               f"{', '.join(sorted(ROLES))}", f"messages[{i}].role")
        check_text(m.content, f"messages[{i}].content")


def chat_segments(render: Callable[[list[dict[str, str]]], Any],
                  messages: Sequence[Message]) -> tuple[list[tuple[str, bool]], list[str]]:
    """Render the chat template; return (segments, stops), each segment (text, is_template_markup)."""
    nonce = str(secrets.randbelow(10**18)).zfill(18)
    mark = re.compile(f"ATOLL{nonce}M([0-9]+)E")
    try:
        r = render([{"role": m.role, "content": f"ATOLL{nonce}M{i}E"} for i, m in enumerate(messages)])
    except ValueError as e:  # the template's raise_exception(): its author's words for the client
        raise RequestError("bad_request", f"the model's chat template refused these messages: {e}",
                           "messages") from None
    except Exception:
        raise RequestError("bad_request", "the model's chat template could not format these messages",
                           "messages") from None
    parts = mark.split(r.prompt)
    segments: list[tuple[str, bool]] = []
    for k, part in enumerate(parts):
        if k % 2:
            segments.append((messages[int(part)].content, False))
        elif part:
            segments.append((part, True))
    stops = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
    return segments, stops


def prompt_runs(segments: list[tuple[str, bool]], special: re.Pattern[str] | None) -> list[tuple[str, bool]]:
    """Merge segments into (text, is_special_token) runs; special tokens are found in markup only."""
    runs: list[tuple[str, bool]] = []
    text: list[str] = []
    for segment, markup in segments:
        if not markup or special is None:
            text.append(segment)
            continue
        pos = 0
        for m in special.finditer(segment):
            text.append(segment[pos:m.start()])
            if any(text):
                runs.append(("".join(text), False))
            text = []
            runs.append((m.group(), True))
            pos = m.end()
        text.append(segment[pos:])
    if any(text):
        runs.append(("".join(text), False))
    return runs


def special_pattern(texts: list[str]) -> re.Pattern[str] | None:
    """A regex matching any of the vocabulary's special-token texts, longest first."""
    texts = sorted({t for t in texts if t}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


class StopScanner:
    """Hold back text that might be the start of a stop string; report when one is hit."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was reached)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        """Text still held back when generation ends without a stop string."""
        out, self.pending = self.pending, ""
        return out
