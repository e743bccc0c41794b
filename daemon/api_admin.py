"""Health probes and the admin API (admin role; errors in the same documented shape as /v1)."""

from __future__ import annotations

import os
import time

import psutil
from aiohttp import web

from daemon.services import SERVICES, VERSION
from runtime.errors import BadRequest


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process is alive and its event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: 200 once a model is loaded and answering, 503 while none is."""
    sched = request.app[SERVICES].scheduler
    models = {name: r.state for name, r in sched.runners.items()}
    ready = sched.any_ready()
    return web.json_response({"status": "ready" if ready else "not ready", "models": models},
                             status=200 if ready else 503)


async def admin_status(request: web.Request) -> web.Response:
    """GET /admin/status: what the daemon serves, for `atoll status`."""
    s = request.app[SERVICES]
    proc = psutil.Process(os.getpid())
    return web.json_response({
        "version": request.app[VERSION],
        "url": s.settings.url(),
        "state_dir": str(s.settings.state_dir),
        "uptime_seconds": round(time.monotonic() - s.started, 1),
        "daemon_pid": os.getpid(),
        "daemon_rss_bytes": proc.memory_info().rss,
        "ready": s.scheduler.any_ready(),
        "audit": s.security.status(),
        "tls": (t := s.security.tls) and {"fingerprint_sha256": t.fingerprint, "not_after": t.not_after,
                                          "subject": t.subject, "names": list(t.sans)},
        "governor": {"state": s.hardware.governor.state.name.lower(), "reason": s.hardware.reason,
                     "admitting": s.scheduler.controls.admitting},
        "models": [r.status() for _, r in sorted(s.scheduler.runners.items())],
        "updates": {"current": (rel := s.updates.release()) and {"sequence": rel.sequence, "version": rel.version},
                    "progress": s.updates.manager.progress.snapshot()},
    })


def _limit(request: web.Request) -> int:
    """The `limit` query parameter, 1..1000 (default 100)."""
    raw = request.query.get("limit", "100")
    if not raw.isdigit() or len(raw) > 6:
        raise BadRequest("limit must be an integer from 1 to 1000", param="limit")
    return max(1, min(1000, int(raw)))


async def admin_usage(request: web.Request) -> web.Response:
    """GET /admin/usage?limit=N: the latest usage records (metadata; text only if log_prompts)."""
    s = request.app[SERVICES]
    return web.json_response({"data": await s.db.run(s.db.usage, _limit(request))})


async def admin_hardware(request: web.Request) -> web.Response:
    """GET /admin/hardware: sensor snapshot, governor state, reason, history, variant decisions, swaps."""
    return web.json_response(request.app[SERVICES].hardware.status())
