"""`atoll serve`: bootstrap, listen, tell systemd we are up, drain and exit cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from aiohttp import web

from daemon import audit, setup_code, tls
from daemon.app import create_app
from daemon.config import Settings
from daemon.db import StateDB
from daemon.edge import GuardedSite, server_options
from daemon.notify import Notifier, ServiceNotify, configure_logging
from daemon.services import Services, bootstrap

log = logging.getLogger(__name__)

#: Retry-After (seconds) given to requests refused while the daemon stops (systemd restarts it in seconds).
SHUTDOWN_RETRY_AFTER = 30.0


def first_start_code(settings: Settings, db: StateDB) -> str | None:
    """On a box with no accounts and no tokens, write a one-time setup code (0600) and return it."""
    if not setup_code.needed(db.db.conn):
        return None
    return setup_code.create(settings.state_dir, settings.setup_code_minutes)


def check_tls(settings: Settings, db: StateDB) -> tls.TlsInfo | None:
    """With TLS on, check the files (TlsError names the file and problem); audit a newly seen certificate."""
    if not settings.tls:
        return None
    default_cert, default_key = tls.default_paths(settings.state_dir)
    info = tls.check(Path(settings.tls_cert) if settings.tls_cert else default_cert,
                     Path(settings.tls_key) if settings.tls_key else default_key)
    seen = audit.query(db.db.conn, {"action": "tls.cert_installed"}, 1)
    if not seen or seen[0]["detail"].get("fingerprint") != info.fingerprint:
        audit.append(db.db.conn, audit.Event("tls.cert_installed", principal="atoll", object=str(info.cert),
                                             detail={"fingerprint": info.fingerprint, "sans": info.sans,
                                                     "not_after": info.not_after}))
    return info


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
    try:
        services.security.tls = check_tls(settings, services.db)
    except tls.TlsError as e:
        raise SystemExit(f"atoll: not starting: {e.message}") from None
    code = first_start_code(settings, services.db)
    app = create_app(settings, services)
    runner = app_runner(app)
    await runner.setup()
    info = services.security.tls
    sites = [GuardedSite(runner, settings.host, settings.port, ssl_context=tls.server_context(info) if info else None)]
    if info and settings.http_loopback_port:
        sites.append(GuardedSite(runner, "127.0.0.1", settings.http_loopback_port))
    for site in sites:
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise SystemExit(f"atoll: cannot listen on {site.name}: {e.strerror}") from None
    url = settings.url()
    log.info("atoll listening on %s (state dir %s)", ", ".join(s.name for s in sites), settings.state_dir)
    if info:
        print(f"atoll: HTTPS certificate SHA-256 fingerprint {info.fingerprint}\n"
              f"       (compare it with what the browser shows)", flush=True)
    if code:
        print(f"\natoll: first start; no accounts exist yet. Create the first admin with this one-time setup code\n"
              f"(valid {settings.setup_code_minutes:g} minutes, single use; also in "
              f"{settings.state_dir / setup_code.FILE}):\n\n"
              f"    {code}\n\n"
              f"    POST {url}/auth/setup  {{\"code\": \"{code}\", \"username\": ..., \"password\": ...}}\n"
              f"or on the box: atoll user create --role admin NAME\n", flush=True)
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
