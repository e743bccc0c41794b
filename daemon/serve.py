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
from daemon.edge import GuardedSite, server_options
from daemon.notify import Notifier, ServiceNotify, configure_logging
from daemon.services import Services, bootstrap

log = logging.getLogger(__name__)

#: Retry-After (seconds) given to requests refused while the daemon stops (systemd restarts it in seconds).
SHUTDOWN_RETRY_AFTER = 30.0


def first_start_token(db: StateDB) -> str | None:
    """On a box with no tokens at all, create one admin token and return it (shown once)."""
    if count_tokens(db) > 0:
        return None
    return create_token(db, "admin", "admin")


def app_runner(app: web.Application) -> web.AppRunner:
    """How `atoll serve` runs the app (tests that depend on it use the same).

    Handlers are not cancelled when their client disconnects (aiohttp's default for
    servers; its test server does cancel them): a request notices the disconnect itself,
    including while it waits in a model's queue (runtime.runner.ModelRunner.stream).
    """
    return web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=10, **server_options(app))


async def drain_for_shutdown(services: Services, settings: Settings) -> None:
    """The first step of a clean stop (SIGTERM), before the HTTP server and the services stop.

    No queued request is started any more; each gets 503 `shutting_down` with Retry-After,
    and so does every new request; running generations get `shutdown_drain_seconds` to
    finish, after which they are cancelled and their streams end with an error event.
    Only then does aiohttp close the connections (responses are complete).
    """
    await services.scheduler.shutdown(settings.shutdown_drain_seconds, SHUTDOWN_RETRY_AFTER)


async def serve(settings: Settings) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    services = bootstrap(settings)
    token = first_start_token(services.db)
    app = create_app(settings, services)
    runner = app_runner(app)
    await runner.setup()
    site = GuardedSite(runner, settings.host, settings.port)
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
    log.info("atoll stopping: draining requests (up to %.0f s)", settings.shutdown_drain_seconds)
    notify.stopping()
    await drain_for_shutdown(services, settings)
    await runner.cleanup()
    await notify.stop()
    log.info("atoll stopped")


def run(settings: Settings) -> None:
    """Blocking entry point for `atoll serve`."""
    configure_logging(settings.log_level)
    asyncio.run(serve(settings))
