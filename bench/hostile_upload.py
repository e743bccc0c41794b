"""/healthz latency while hostile bundle tars are uploaded to the real daemon, in one run.

usage: python -m bench.hostile_upload [--rounds 3]

Starts the daemon in-process (real app, real HTTP over TCP, a fresh state dir with a
trust root and no models), then for each hostile case (the tars of
tests/sync/test_tar_hostile.py: a pax header of 1 MiB of digits, a huge pax header, a
GNU sparse member, a GNU long name, 1025 members, ...) uploads it to POST /admin/bundles
while a second client polls /healthz every 10 ms. Prints per case the upload's answer
and time, and the median and maximum /healthz latency, next to the idle latency
measured in the same run (the goal: every /healthz answer within 1 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from daemon.app import create_app
from daemon.auth import create_token
from daemon.config import Settings
from daemon.services import bootstrap
from tests.sync.helpers import Keyring
from tests.sync.test_tar_hostile import HOSTILE


async def _poll(session: aiohttp.ClientSession, url: str, stop: asyncio.Event) -> list[float]:
    out: list[float] = []
    while not stop.is_set():
        t0 = time.perf_counter()
        async with session.get(f"{url}/healthz") as r:
            await r.read()
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(0.01)
    return out


async def run(rounds: int) -> None:
    """Run every case `rounds` times and print the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        kr = Keyring(Path(tmp) / "keys")
        kr.root_keys, kr.bundle_keys = kr.new_keys("root", 1), kr.new_keys("bundle", 1)
        (state / "trust").mkdir(parents=True)
        (state / "trust" / "root.json").write_text(json.dumps(kr.root_doc(1, kr.root_keys, kr.bundle_keys,
                                                                          threshold=1)))
        settings = Settings(state_dir=state, usb_watch=False, threads=1)
        services = bootstrap(settings)
        admin = create_token(services.db, "bench", "admin")
        runner = web.AppRunner(create_app(settings, services))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {admin}", "Content-Type": "application/x-tar"}
        try:
            async with aiohttp.ClientSession() as health, aiohttp.ClientSession() as up:
                stop = asyncio.Event()
                idle_task = asyncio.create_task(_poll(health, url, stop))
                await asyncio.sleep(2.0)
                stop.set()
                idle = await idle_task
                print(f"idle /healthz: median {statistics.median(idle) * 1e3:.1f} ms, "
                      f"max {max(idle) * 1e3:.1f} ms ({len(idle)} requests)")
                print(f"{'case':22} {'bytes':>9} {'answer':>22} {'upload ms':>10} {'healthz med ms':>15} "
                      f"{'healthz max ms':>15}")
                worst = 0.0
                for case in sorted(HOSTILE):
                    data, _ = HOSTILE[case]
                    for _ in range(rounds):
                        stop = asyncio.Event()
                        poll = asyncio.create_task(_poll(health, url, stop))
                        await asyncio.sleep(0.05)
                        t0 = time.perf_counter()
                        async with up.post(f"{url}/admin/bundles", data=data, headers=headers) as r:
                            body = await r.json()
                        took = time.perf_counter() - t0
                        await asyncio.sleep(0.05)
                        stop.set()
                        lat = await poll
                        worst = max(worst, max(lat))
                    answer = f"{r.status} {body.get('error', {}).get('code', '')}"
                    print(f"{case:22} {len(data):>9} {answer:>22} {took * 1e3:>10.1f} "
                          f"{statistics.median(lat) * 1e3:>15.1f} {max(lat) * 1e3:>15.1f}")
                print(f"worst /healthz latency during any hostile upload: {worst * 1e3:.1f} ms "
                      f"({worst / statistics.median(idle):.1f}x the idle median)")
        finally:
            await runner.cleanup()


def main() -> None:
    """Parse arguments and run."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    asyncio.run(run(ap.parse_args().rounds))


if __name__ == "__main__":
    main()
