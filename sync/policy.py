"""The site policy: a TOML document carried (signed) in every bundle.

Example (every table and key shown is required unless marked optional):

    schema = 1

    [models]
    allowed_families = ["smollm2-135m"]   # families the daemon may serve

    [limits]
    max_context = 4096          # tokens, 128..1048576
    max_tokens = 1024           # per request, 1..max_context
    queue_size = 16             # per model, 1..10000

    [thermal]                   # governor thresholds, degrees C, 30..120
    constrained_c = 80.0
    critical_c = 90.0           # > constrained_c

    [memory]                    # governor thresholds, free MiB
    constrained_free_mb = 1024
    critical_free_mb = 512      # < constrained_free_mb

    [logging]
    log_prompts = false
    prompt_retention_days = 0   # 1..3650 when log_prompts, else 0

    [sessions]                  # optional: overrides the box's settings
    idle_minutes = 30           # 1..1440
    absolute_hours = 12         # 0.1..168

    [audit]                     # optional
    retention_days = 0          # 0 keeps every row; else 30..36500 (rows older are pruned at a signed cut)

Unknown keys, wrong types and out-of-range values are refused with a message that
names the key; a policy that fails here fails its whole bundle.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.store import FAMILY_RE
from sync.errors import BundleRejected

log = logging.getLogger(__name__)

MAX_POLICY_BYTES = 64 * 1024
#: A complete, commented policy to start from (shipped with the package).
EXAMPLE_POLICY = Path(__file__).with_name("policy.example.toml")


@dataclass(frozen=True)
class Policy:
    """A validated site policy."""

    allowed_families: tuple[str, ...]
    max_context: int
    max_tokens: int
    queue_size: int
    thermal_constrained_c: float
    thermal_critical_c: float
    memory_constrained_free_mb: int
    memory_critical_free_mb: int
    log_prompts: bool
    prompt_retention_days: int
    session_idle_minutes: float | None = None
    session_absolute_hours: float | None = None
    audit_retention_days: int | None = None


def _bad(msg: str) -> BundleRejected:
    return BundleRejected(f"policy: {msg}", code="bad_policy")


class _Table:
    def __init__(self, doc: dict[str, Any], name: str, keys: set[str]) -> None:
        t = doc.get(name)
        if not isinstance(t, dict):
            raise _bad(f"missing table [{name}]")
        if extra := sorted(set(t) - keys):
            raise _bad(f"unknown key(s) in [{name}]: {', '.join(extra)}")
        if missing := sorted(keys - set(t)):
            raise _bad(f"missing key(s) in [{name}]: {', '.join(missing)}")
        self.t, self.name = t, name

    def int(self, key: str, lo: int, hi: int) -> int:
        """The integer at `key`, within lo..hi."""
        v = self.t[key]
        if not isinstance(v, int) or isinstance(v, bool):
            raise _bad(f"{self.name}.{key} must be an integer")
        if not lo <= v <= hi:
            raise _bad(f"{self.name}.{key} = {v} is out of range {lo}..{hi}")
        return v

    def float(self, key: str, lo: float, hi: float) -> float:
        """The number at `key`, within lo..hi."""
        v = self.t[key]
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise _bad(f"{self.name}.{key} must be a number")
        if not lo <= v <= hi:
            raise _bad(f"{self.name}.{key} = {v} is out of range {lo}..{hi}")
        return float(v)

    def bool(self, key: str) -> bool:
        """The boolean at `key`."""
        v = self.t[key]
        if not isinstance(v, bool):
            raise _bad(f"{self.name}.{key} must be true or false")
        return v


def parse_policy(data: bytes) -> Policy:
    """Parse and validate policy TOML bytes; raise BundleRejected(code='bad_policy') naming the problem."""
    if len(data) > MAX_POLICY_BYTES:
        raise _bad(f"larger than {MAX_POLICY_BYTES} bytes")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise _bad(f"not valid TOML: {e}") from e
    tables = {"models", "limits", "thermal", "memory", "logging", "sessions", "audit"}
    if extra := sorted(set(doc) - tables - {"schema"}):
        raise _bad(f"unknown key(s) at top level: {', '.join(extra)}")
    schema = doc.get("schema")
    if type(schema) is not int or schema != 1:  # exactly the integer: not true, not 1.0
        raise _bad(f"schema must be the integer 1, got {schema!r}")
    models = _Table(doc, "models", {"allowed_families"})
    fams = models.t["allowed_families"]
    if not isinstance(fams, list) or not all(isinstance(f, str) and FAMILY_RE.fullmatch(f) for f in fams):
        raise _bad("models.allowed_families must be a list of family names")
    if len(set(fams)) != len(fams):
        raise _bad("models.allowed_families lists a family twice")
    limits = _Table(doc, "limits", {"max_context", "max_tokens", "queue_size"})
    max_context = limits.int("max_context", 128, 1 << 20)
    max_tokens = limits.int("max_tokens", 1, max_context)
    thermal = _Table(doc, "thermal", {"constrained_c", "critical_c"})
    constrained_c = thermal.float("constrained_c", 30, 120)
    critical_c = thermal.float("critical_c", 30, 120)
    if critical_c <= constrained_c:
        raise _bad("thermal.critical_c must be above thermal.constrained_c")
    memory = _Table(doc, "memory", {"constrained_free_mb", "critical_free_mb"})
    mem_constrained = memory.int("constrained_free_mb", 0, 1 << 24)
    mem_critical = memory.int("critical_free_mb", 0, 1 << 24)
    if mem_critical >= mem_constrained:
        raise _bad("memory.critical_free_mb must be below memory.constrained_free_mb")
    logging_t = _Table(doc, "logging", {"log_prompts", "prompt_retention_days"})
    log_prompts = logging_t.bool("log_prompts")
    retention = logging_t.int("prompt_retention_days", 1 if log_prompts else 0, 3650 if log_prompts else 0)
    idle = absolute = audit_days = None
    if "sessions" in doc:
        sessions = _Table(doc, "sessions", {"idle_minutes", "absolute_hours"})
        idle, absolute = sessions.float("idle_minutes", 1, 1440), sessions.float("absolute_hours", 0.1, 168)
    if "audit" in doc:
        audit_days = _Table(doc, "audit", {"retention_days"}).int("retention_days", 0, 36_500)
        if 0 < audit_days < 30:
            raise _bad(f"audit.retention_days = {audit_days}: 0 (keep every row) or at least 30")
    return Policy(tuple(fams), max_context, max_tokens, limits.int("queue_size", 1, 10_000),
                  constrained_c, critical_c, mem_constrained, mem_critical, log_prompts, retention,
                  idle, absolute, audit_days)


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file (e.g. a policy blob of the current release)."""
    with path.open("rb") as f:
        return parse_policy(f.read(MAX_POLICY_BYTES + 1))
