"""JSON Schemas of request bodies: used to validate at the edge and to write /openapi.json."""

from __future__ import annotations

from typing import Any

_MODEL = {"type": "string", "minLength": 1, "description": "a model id from GET /v1/models"}
_SAMPLING: dict[str, Any] = {
    "temperature": {"type": "number", "minimum": 0, "maximum": 2,
                    "description": "0 is greedy; default 1"},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                       {"type": "null"}]},
    "seed": {"type": ["integer", "null"], "minimum": -(2**63), "maximum": 2**63 - 1},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {"type": ["object", "null"],
                       "properties": {"include_usage": {"type": "boolean"}}},
    "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 1, "description": "only 1 is supported"},
    "user": {"type": "string"},
}

ROLES = ["system", "developer", "user", "assistant"]

CHAT_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": _MODEL,
        "messages": {
            "type": "array", "minItems": 1,
            "items": {
                "type": "object", "required": ["role", "content"],
                "properties": {
                    "role": {"enum": ROLES},
                    "content": {"anyOf": [
                        {"type": "string"},
                        {"type": "array", "items": {
                            "type": "object", "required": ["type", "text"],
                            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}},
                    ]},
                    "name": {"type": "string"},
                },
            },
        },
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
        **_SAMPLING,
    },
}

COMPLETION_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        "model": _MODEL,
        "prompt": {"anyOf": [{"type": "string"},
                             {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1}],
                   "description": "a string (or a one-element list of strings)"},
        "echo": {"enum": [False, None], "description": "not supported"},
        "logprobs": {"type": "null", "description": "not supported"},
        "best_of": {"type": ["integer", "null"], "minimum": 1, "maximum": 1},
        **_SAMPLING,
    },
}

EMBEDDING_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": _MODEL,
        "input": {"anyOf": [{"type": "string"},
                            {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 256}]},
        "encoding_format": {"enum": ["float", "base64"],
                            "description": "base64: little-endian float32 bytes (what the openai package asks for)"},
        "user": {"type": "string"},
    },
}

BUNDLE_PATH_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["path"],
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
