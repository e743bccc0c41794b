"""Who may call what: one table of roles per route; anything not listed is admin-only.

Roles: `user` (inference, own usage), `admin` (everything), `auditor` (read-only: the
audit log, usage, status; no inference, no changes). `/healthz` and `/readyz` need no
credentials; `/auth/login` and `/auth/setup` carry theirs in the body.
"""

from __future__ import annotations

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
#: Routes whose body is the credential (no session or token is needed, or possible, before them).
CREDENTIAL_ROUTES = frozenset({("POST", "/auth/login"), ("POST", "/auth/setup")})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_EVERYONE = frozenset({"user", "admin", "auditor"})
_INFERENCE = frozenset({"user", "admin"})
_READERS = frozenset({"admin", "auditor"})

#: (method, path or path prefix ending in '/') -> roles. Checked most specific first.
RULES: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/openapi.json"): _EVERYONE,
    ("GET", "/auth/me"): _EVERYONE,
    ("POST", "/auth/logout"): _EVERYONE,
    ("GET", "/auth/usage"): _EVERYONE,
    ("POST", "/auth/password"): _EVERYONE,
    ("POST", "/v1/chat/completions"): _INFERENCE,
    ("POST", "/v1/completions"): _INFERENCE,
    ("POST", "/v1/embeddings"): _INFERENCE,
    ("GET", "/v1/models"): _INFERENCE,
    ("GET", "/admin/status"): _READERS,
    ("GET", "/admin/usage"): _READERS,
    ("GET", "/admin/hardware"): _READERS,
    ("GET", "/admin/bundles"): _READERS,
    ("GET", "/admin/audit"): _READERS,
    ("GET", "/admin/audit/verify"): _READERS,
}


def allowed_roles(method: str, path: str) -> frozenset[str]:
    """The roles that may call `method path` (HEAD counts as GET)."""
    m = "GET" if method == "HEAD" else method
    return RULES.get((m, path), frozenset({"admin"}))
