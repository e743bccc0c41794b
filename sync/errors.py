"""Errors raised by sync: every refusal carries a machine-readable `code`.

Codes are stable strings the admin API and the audit log show as they are; callers
branch on the class or on `code`, never on the message.
"""

from __future__ import annotations

from runtime.errors import AtollError, BadRequest


class BundleRejected(BadRequest):
    """The bundle was refused before anything on the box changed; `code` says why."""

    code = "bundle_rejected"


class AlreadyInstalled(BundleRejected):
    """The bundle's sequence and content equal the installed release: nothing to do."""

    status, code = 200, "already_installed"


class InsufficientSpace(BundleRejected):
    """The store's filesystem lacks room for the missing blobs plus headroom."""

    status, code = 507, "insufficient_space"


class ImportFailed(AtollError):
    """A verified bundle could not be applied (I/O, health check); the old release stays."""

    status, type, code = 422, "invalid_request_error", "import_failed"


class ImportInProgress(AtollError):
    """Another import or rollback holds the store's sync lock."""

    status, type, code = 409, "invalid_request_error", "import_in_progress"


class RollbackUnavailable(AtollError):
    """There is no previous release to return to."""

    status, type, code = 409, "invalid_request_error", "no_previous_release"


class TrustError(BadRequest):
    """A trust root document or key file is unusable (admin side or provisioning)."""

    code = "bad_trust_root"
