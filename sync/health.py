"""Health checks run on a built release before `current` switches to it.

A check is `async (release, store) -> None` that raises to fail. The built-in ones
validate the policy and read every model's GGUF header (which also catches truncation);
the daemon adds its own (load the model in a fresh worker, run a smoke prompt) with
`SyncManager(..., health_checks=(*DEFAULT_HEALTH_CHECKS, daemon.smoke.ModelHealthCheck(...)))`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from hardware.gguf import GGUFError, read_gguf
from runtime.store import ModelStore
from sync.errors import ImportFailed
from sync.state import Release

log = logging.getLogger(__name__)

HealthCheck = Callable[[Release, ModelStore], Awaitable[None]]


async def check_policy(release: Release, store: ModelStore) -> None:
    """The release's policy parses and validates; families it does not allow are logged."""
    policy = await asyncio.to_thread(release.policy, store)
    if denied := sorted(set(release.families) - set(policy.allowed_families)):
        log.warning("release %d ships families its policy does not allow: %s", release.sequence, denied)


def _read_headers(release: Release, store: ModelStore) -> None:
    for fam, variants in release.families.items():
        for v in variants:
            try:
                read_gguf(store.blob_path(v["digest"]))
            except GGUFError as e:
                raise ImportFailed(f"model {fam} variant sha256-{v['digest'][:12]}: {e}",
                                   code="health_check_failed") from e


async def check_gguf_headers(release: Release, store: ModelStore) -> None:
    """Every model blob of the release has a readable, complete GGUF header."""
    await asyncio.to_thread(_read_headers, release, store)


DEFAULT_HEALTH_CHECKS: tuple[HealthCheck, ...] = (check_policy, check_gguf_headers)
