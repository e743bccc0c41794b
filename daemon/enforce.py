"""Putting a signed policy in force: request limits, queue size, context cap, governor thresholds.

The one place that changes the running parts' knobs when a policy arrives or goes; the
parts read them on each use (scheduler config, placement policy, governor thresholds).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import psutil

from daemon.config import Settings
from daemon.governance import HardwareControl
from hardware.governor import GovernorThresholds
from runtime.scheduler import Scheduler
from sync.policy import Policy

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Limits:
    """Request limits in force: from the settings, tightened by the signed policy when one is installed."""

    max_tokens: int | None = None
    log_prompts: bool = False
    prompt_retention_days: int = 0
    allowed_families: frozenset[str] | None = None
    session_idle_minutes: float | None = None
    session_absolute_hours: float | None = None
    audit_retention_days: int = 0


def governor_thresholds(base: GovernorThresholds, policy: Policy | None) -> GovernorThresholds:
    """The settings' governor thresholds with the policy's thermal and memory limits applied."""
    if policy is None:
        return base
    total_mb = psutil.virtual_memory().total / 2**20
    return dataclasses.replace(
        base, cpu_constrained_c=policy.thermal_constrained_c, cpu_critical_c=policy.thermal_critical_c,
        gpu_constrained_c=policy.thermal_constrained_c, gpu_critical_c=policy.thermal_critical_c,
        ram_constrained_available_pct=min(99.0, 100.0 * policy.memory_constrained_free_mb / total_mb),
        ram_critical_available_pct=min(98.0, 100.0 * policy.memory_critical_free_mb / total_mb))


class PolicyEnforcer:
    """Applies a policy (or, with None, the settings alone) to the limits, scheduler and hardware control."""

    def __init__(self, settings: Settings, limits: Limits, scheduler: Scheduler, hardware: HardwareControl) -> None:
        self.settings, self.limits, self.scheduler, self.hardware = settings, limits, scheduler, hardware
        #: called with the new policy when one different from the last is put in force after the first
        self.on_change: Callable[[Policy | None], None] | None = None
        self._applied_once = False
        self._in_force: Policy | None = None

    def apply(self, policy: Policy | None) -> None:
        """Put a policy's limits in force (None: the settings alone); a later change is reported to on_change."""
        if self._applied_once and policy != self._in_force and self.on_change:
            self.on_change(policy)
        self._applied_once, self._in_force = True, policy
        s = self.settings
        self.limits.max_tokens = policy.max_tokens if policy else None
        self.limits.log_prompts = policy.log_prompts if policy else s.log_prompts
        self.limits.prompt_retention_days = policy.prompt_retention_days if policy else 0
        self.limits.allowed_families = frozenset(policy.allowed_families) if policy else None
        self.limits.session_idle_minutes = policy.session_idle_minutes if policy else None
        self.limits.session_absolute_hours = policy.session_absolute_hours if policy else None
        self.limits.audit_retention_days = (policy.audit_retention_days or 0) if policy else 0
        self.scheduler.config.queue_size = policy.queue_size if policy else s.queue_size
        n_ctx = min(s.n_ctx, policy.max_context) if policy else s.n_ctx
        self.scheduler.config.n_ctx = n_ctx
        self.hardware.policy = dataclasses.replace(self.hardware.policy, max_n_ctx=n_ctx)
        self.hardware.governor.machine.thresholds = governor_thresholds(s.governor, policy)
