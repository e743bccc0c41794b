"""`atoll serve`: bootstrap, listen, tell systemd we are up, drain and exit cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from daemon.app import create_app
from daemon.auth import count_tokens, create_token
from daemon.config import Settings
from daemon.db import StateDB
from daemon.notify import Notifier, ServiceNotify, configure_logging
from daemon.services import bootstrap

log = logging.getLogger(__name__)


def first_start_token(db: StateDB) -> str | None:
    """On a box with no tokens at all, create one admin token and return it (shown once)."""
    if count_tokens(db) > 0:
        return None
    return create_token(db, "admin", "admin")


async def serve(settings: Settings) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    services = bootstrap(settings)
    token = first_start_token(services.db)
    app = create_app(settings, services)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=10)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise SystemExit(f"atoll: cannot listen on {settings.host}:{settings.port}: {e.strerror}") from None
    url = settings.url()
    log.info("atoll listening on %s:%s (state dir %s)", settings.host, settings.port, settings.state_dir)
    if token:
        print(f"\natoll: first start; no API tokens existed, so an admin token was created.\n"
              f"It is shown only this once; keep it safe (revoke with `atoll token revoke admin`):\n\n"
              f"    {token}\n\n"
              f"Try it:\n"
              f"    curl -H 'Authorization: Bearer {token}' {url}/v1/models\n"
              f"OpenAI clients: base_url={url}/v1  api_key=<the token>\n", flush=True)
    else:
        print(f"atoll: serving on {url} (OpenAI base_url {url}/v1)", flush=True)
    notify = ServiceNotify(Notifier.from_env(), services)
    await notify.start()  # READY=1 once every served family has settled
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("atoll stopping: draining requests")
    notify.stopping()
    await runner.cleanup()
    await notify.stop()
    log.info("atoll stopped")


def run(settings: Settings) -> None:
    """Blocking entry point for `atoll serve`."""
    configure_logging(settings.log_level)
    asyncio.run(serve(settings))
