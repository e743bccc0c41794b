"""atoll's error hierarchy: each API-facing error carries its HTTP status and OpenAI error type.

Exactly one middleware (daemon.http.errors) maps these to responses. Code never
matches on message strings: it catches the class.
"""

from __future__ import annotations


class AtollError(Exception):
    """Base of every error atoll raises on purpose."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"
    #: Retry-After (seconds) when the raiser gives none; every 503 has one.
    default_retry_after: float | None = None

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.retry_after = retry_after if retry_after is not None else self.default_retry_after


class BadRequest(AtollError):
    """The request is malformed or asks for something impossible."""

    status, type, code = 400, "invalid_request_error", "invalid_request"


class ContextLengthExceeded(BadRequest):
    """Prompt plus max_tokens does not fit the model's context window."""

    code = "context_length_exceeded"


class Unauthorized(AtollError):
    """No token, or a token that is unknown or revoked."""

    status, type, code = 401, "authentication_error", "invalid_api_key"


class Forbidden(AtollError):
    """The token is valid but its role may not do this."""

    status, type, code = 403, "permission_error", "insufficient_role"


class NotFound(AtollError):
    """The named thing (model, route) does not exist."""

    status, type, code = 404, "invalid_request_error", "not_found"


class PayloadTooLarge(AtollError):
    """The request body is over the configured limit."""

    status, type, code = 413, "invalid_request_error", "payload_too_large"


class UnsupportedMediaType(AtollError):
    """The body is not sent as the media type the route takes (JSON routes: application/json)."""

    status, type, code = 415, "invalid_request_error", "unsupported_media_type"


class TooManyFailedLogins(AtollError):
    """Too many failed authentications from this address; retry after `retry_after` seconds."""

    status, type, code = 429, "rate_limit_error", "too_many_failed_auth"


class QueueFull(AtollError):
    """The model's queue is full; the client should retry after `retry_after` seconds."""

    status, type, code = 429, "rate_limit_error", "queue_full"


class Unavailable(AtollError):
    """The service cannot answer right now (loading, broken model, crashed worker, shutting down)."""

    status, type, code = 503, "server_error", "unavailable"
    default_retry_after = 5.0


class WorkerCrashed(Unavailable):
    """The worker process running the request died; it is being restarted."""

    code = "worker_crashed"


class InsufficientStorage(AtollError):
    """The daemon ran out of disk space (or quota) while handling the request."""

    status, type, code = 507, "server_error", "insufficient_storage"


class DeadlineExceeded(AtollError):
    """The request did not finish within its deadline."""

    status, type, code = 504, "server_error", "deadline_exceeded"
