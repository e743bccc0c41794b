"""Reading request bodies at the edge: media type, a bounded JSON parse, schema validation.

Every way a body can be wrong ends as a 400 (or 415 for the media type) that names the field,
never as a 500:

- the media type must be `application/json` (UTF-8): a form, `text/plain` or multipart body
  is refused 415 before it is read, so a browser on another site cannot post to the API
  (a "simple" cross-site request cannot carry `application/json`);
- integers are bounded while they are parsed (more than 19 digits, or outside a signed 64-bit
  range: refused, so Python's int/str conversion limit and C-level overflows are never
  reached), `NaN`/`Infinity` and floats that overflow to infinity are refused;
- nesting is bounded (`MAX_DEPTH`; the parser's own recursion limit is a 400 too);
- strings must be encodable as UTF-8 (a lone surrogate such as `"\\ud800"` is refused here,
  before it reaches a tokenizer);
- a schema "integer" is a JSON integer: `5.0` is not a valid `max_tokens`;
- fields atoll does not implement are refused by name (`schemas.NOT_IMPLEMENTED`), and so are
  unknown fields (`additionalProperties: false`).

Bodies larger than `OFF_LOOP_BYTES` are parsed and validated in a thread, so a big body does
not stall the event loop (`/healthz` keeps answering).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable
from typing import Any

import jsonschema
from aiohttp import web

from daemon.schemas import NOT_IMPLEMENTED
from runtime.errors import BadRequest, UnsupportedMediaType

#: Deepest nesting a request body may have (atoll's own schemas need 4).
MAX_DEPTH = 32
#: Bodies at least this big are parsed and validated off the event loop.
OFF_LOOP_BYTES = 64 * 1024
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1

Precheck = Callable[[dict[str, Any]], None]


class _BadNumber:
    """A number the parser refused; the walk reports it with the field it sits in."""

    def __init__(self, text: str, why: str) -> None:
        self.text, self.why = text, why


def _parse_int(s: str) -> int | _BadNumber:
    if len(s) > 20:
        return _BadNumber(s[:12] + "…", f"integer of {len(s.lstrip('-'))} digits is out of range")
    v = int(s)
    if not _INT_MIN <= v <= _INT_MAX:
        return _BadNumber(s, "integer is out of range (signed 64-bit)")
    return v


def _parse_float(s: str) -> float | _BadNumber:
    v = float(s)
    if not math.isfinite(v):
        return _BadNumber(s[:12], "number overflows to infinity")
    return v


def _parse_constant(s: str) -> _BadNumber:
    return _BadNumber(s, f"{s} is not a valid JSON number")


def field_name(path: list[str | int] | tuple[str | int, ...]) -> str:
    """A field path as people write it: `messages[0].content`."""
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path))


def _bad(path: list[str | int], message: str, code: str = "invalid_value") -> BadRequest:
    where = field_name(path)
    return BadRequest(f"{where or 'body'}: {message}", param=where or None, code=code)


_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}:,]')


def _too_deep_at(text: str) -> list[str | int]:
    """The top-level field holding nesting deeper than MAX_DEPTH (empty: the body itself)."""
    stack: list[list[Any]] = []  # [kind, key or index]
    last = ""
    for m in _TOKENS.finditer(text):
        tok = m.group()
        if tok[0] == '"':
            last = tok
        elif tok in "[{":
            stack.append(["a", 0] if tok == "[" else ["o", None])
            if len(stack) > MAX_DEPTH:
                kind, first = stack[0]
                return [first] if kind == "o" and first is not None else []
        elif tok in "]}":
            if stack:
                stack.pop()
        elif tok == ":" and stack and stack[-1][0] == "o":
            try:
                stack[-1][1] = json.loads(last)
            except ValueError:
                stack[-1][1] = None
        elif tok == "," and stack and stack[-1][0] == "a":
            stack[-1][1] += 1
    return []


def parse_json(raw: bytes) -> dict[str, Any]:
    """Parse a request body as a JSON object with bounded numbers, depth and valid strings."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding") from None
    try:
        body = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except json.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                         code="invalid_json") from None
    except RecursionError:
        raise _bad(_too_deep_at(text), f"nested too deeply (at most {MAX_DEPTH} levels)") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    return body


def check_values(body: dict[str, Any]) -> None:
    """Refuse refused numbers, over-deep nesting and strings that are not valid Unicode, naming the field."""
    stack: list[tuple[list[str | int], Any]] = [([], body)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise _bad(path, f"text holds an invalid character (a lone surrogate) at index {e.start}",
                               code="invalid_encoding") from None
        elif isinstance(v, _BadNumber):
            raise _bad(path, v.why)
        elif isinstance(v, dict | list):
            if len(path) >= MAX_DEPTH:
                raise _bad(path[:1], f"nested too deeply (at most {MAX_DEPTH} levels)")
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, item in items:
                if isinstance(k, str) and not k.isascii():
                    try:
                        k.encode("utf-8")
                    except UnicodeEncodeError:
                        raise _bad(path, "a key holds an invalid character (a lone surrogate)",
                                   code="invalid_encoding") from None
                stack.append(([*path, k], item))


def _is_integer(_checker: Any, instance: Any) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer))


def validate(body: dict[str, Any], schema: dict[str, Any]) -> None:
    """Validate against a JSON Schema; a 400 names the field (and says when atoll does not implement it)."""
    err = jsonschema.exceptions.best_match(_Validator(schema).iter_errors(body))
    if err is None:
        return
    path: list[str | int] = list(err.absolute_path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        raise _bad([*path, extra[0]], "unknown field; atoll does not accept it (see the README's table of "
                                      "request fields)", code="unknown_field")
    if len(path) == 1 and path[0] in NOT_IMPLEMENTED:
        raise _bad(path, f"not implemented by atoll yet ({NOT_IMPLEMENTED[path[0]][1]}); it would change the "
                         f"output, so it is refused rather than ignored", code="unsupported_field")
    raise _bad(path, err.message)


def check_and_validate(raw: bytes, schema: dict[str, Any], precheck: Precheck | None = None) -> dict[str, Any]:
    """Parse, bound (precheck: cheap limits before the costly checks), check values, validate."""
    body = parse_json(raw)
    if precheck is not None:
        precheck(body)
    check_values(body)
    validate(body, schema)
    return body


def require_json(request: web.Request) -> None:
    """Refuse any media type but `application/json` (UTF-8) with 415 before reading the body."""
    charset = (request.charset or "utf-8").lower()
    if request.content_type != "application/json" or charset not in ("utf-8", "utf8"):
        got = request.headers.get("Content-Type") or "no Content-Type"
        raise UnsupportedMediaType(f"send the body as Content-Type: application/json (UTF-8); got {got[:80]}")


async def read_json(request: web.Request, schema: dict[str, Any], precheck: Precheck | None = None) -> dict[str, Any]:
    """Read an `application/json` body and validate it; big bodies are checked in a thread."""
    require_json(request)
    raw = await request.read()
    if len(raw) < OFF_LOOP_BYTES:
        return check_and_validate(raw, schema, precheck)
    return await asyncio.to_thread(check_and_validate, raw, schema, precheck)
