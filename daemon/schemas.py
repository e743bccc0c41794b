"""JSON Schemas of request bodies: used to validate at the edge and to write /openapi.json.

Which request fields are honoured, which are accepted because they cannot change the output,
and which are refused because atoll does not implement them yet: `NOT_IMPLEMENTED` and
`ACCEPTED_IGNORED` below are the one place that says so (the README's table mirrors them, and
a test keeps the two in step). Implementing a field means moving it out of NOT_IMPLEMENTED.
"""

from __future__ import annotations

from typing import Any

#: Largest integer any count field takes (tokens, items): bounded so nothing downstream overflows.
INT32_MAX = 2**31 - 1

#: Fields that would change the output but are not implemented: field -> (values that mean
#: "off", accepted as no-ops; what the field does). Anything else is a 400 naming the field.
NOT_IMPLEMENTED: dict[str, tuple[list[Any], str]] = {
    "response_format": ([{"type": "text"}, None], "structured output / JSON mode"),
    "tools": ([[], None], "tool calling"),
    "tool_choice": (["none", None], "tool calling"),
    "functions": ([[], None], "function calling"),
    "function_call": (["none", None], "function calling"),
    "logit_bias": ([{}, None], "token biasing"),
    "presence_penalty": ([0, None], "presence penalty"),
    "frequency_penalty": ([0, None], "frequency penalty"),
    "repeat_penalty": ([None], "repetition penalty"),
    "top_k": ([None], "top-k sampling"),
    "min_p": ([None], "min-p sampling"),
    "logprobs": ([False, None], "log probabilities"),
    "top_logprobs": ([0, None], "log probabilities"),
    "n": ([1, None], "several choices per request"),
    "best_of": ([1, None], "several candidates per request"),
    "echo": ([False, None], "echoing the prompt"),
    "suffix": ([None], "insertion (text after the completion)"),
    "dimensions": ([None], "shortened embeddings"),
}

#: Fields accepted and ignored because they cannot change the output.
ACCEPTED_IGNORED: dict[str, str] = {
    "user": "an end-user id for the caller's own records",
    "metadata": "the caller's own tags",
    "store": "OpenAI-side storage; atoll keeps usage metadata only (see log_prompts)",
    "service_tier": "OpenAI's capacity tier",
    "parallel_tool_calls": "only matters with tools, which are refused",
    "prompt_cache_key": "a cache hint; never changes the output",
    "safety_identifier": "an end-user id for the caller's own records",
}


def _refused(names: tuple[str, ...]) -> dict[str, Any]:
    return {name: {"enum": NOT_IMPLEMENTED[name][0],
                   "description": f"not implemented ({NOT_IMPLEMENTED[name][1]}): only "
                                  f"{' or '.join('null' if v is None else repr(v) for v in NOT_IMPLEMENTED[name][0])}"
                                  f" accepted"} for name in names}


def _ignored(names: tuple[str, ...]) -> dict[str, Any]:
    return {name: {"description": f"accepted and ignored: {ACCEPTED_IGNORED[name]}"} for name in names}


_IGNORED_ALL = tuple(ACCEPTED_IGNORED)
_REFUSED_GENERATION = ("response_format", "tools", "tool_choice", "functions", "function_call", "logit_bias",
                       "presence_penalty", "frequency_penalty", "repeat_penalty", "top_k", "min_p", "logprobs",
                       "top_logprobs", "n")

_MODEL = {"type": "string", "minLength": 1, "maxLength": 256, "description": "a model id from GET /v1/models"}
_SAMPLING: dict[str, Any] = {
    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2,
                    "description": "0 is greedy; default 1"},
    "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": INT32_MAX},
    "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                       {"type": "null"}]},
    "seed": {"type": ["integer", "null"], "minimum": -(2**63), "maximum": 2**63 - 1},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {"type": ["object", "null"], "additionalProperties": False,
                       "properties": {"include_usage": {"type": "boolean"}}},
    **_ignored(_IGNORED_ALL),
    **_refused(_REFUSED_GENERATION),
}

ROLES = ["system", "developer", "user", "assistant"]

CHAT_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "messages"],
    "additionalProperties": False,
    "properties": {
        "model": _MODEL,
        "messages": {
            "type": "array", "minItems": 1,
            "items": {
                "type": "object", "required": ["role", "content"], "additionalProperties": False,
                "properties": {
                    "role": {"enum": ROLES},
                    "content": {"anyOf": [
                        {"type": "string"},
                        {"type": "array", "items": {
                            "type": "object", "required": ["type", "text"], "additionalProperties": False,
                            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}},
                    ]},
                    "name": {"type": "string"},
                },
            },
        },
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": INT32_MAX},
        **_SAMPLING,
    },
}

COMPLETION_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "prompt"],
    "additionalProperties": False,
    "properties": {
        "model": _MODEL,
        "prompt": {"anyOf": [{"type": "string", "minLength": 1},
                             {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
                              "maxItems": 1}],
                   "description": "a non-empty string (or a one-element list of one)"},
        **_SAMPLING,
        **_refused(("best_of", "echo", "suffix")),
    },
}

EMBEDDING_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "input"],
    "additionalProperties": False,
    "properties": {
        "model": _MODEL,
        "input": {"anyOf": [{"type": "string"},
                            {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 256}]},
        "encoding_format": {"enum": ["float", "base64", None],
                            "description": "base64: little-endian float32 bytes (what the openai package asks for)"},
        **_ignored(_IGNORED_ALL),
        **_refused(("dimensions",)),
    },
}

BUNDLE_PATH_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["path"],
    "additionalProperties": False,
    "properties": {"path": {"type": "string", "minLength": 1,
                            "description": "directory on the box holding ATOLL/ (or send the bundle as a tar body "
                                           "with Content-Type application/x-tar)"}},
}

ERROR_RESPONSE: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "code": {"type": ["string", "null"]}, "param": {"type": ["string", "null"]}},
    }},
}
