"""The update side's parts (issue 7 item 20): reloads are serialized, the watch on `current`
survives its own errors. Real app, real workers, real bundles."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import psutil

from daemon.services import SERVICES
from runtime.store import ModelStore
from sync.apply import SyncManager
from sync.verify import SyncConfig
from tests.daemon.test_updates import bundle, keyring, models, provisioned  # noqa: F401 - fixtures


def _workers_for(path: Path) -> int:
    n = 0
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "runtime.worker" in cmd and str(path) in cmd:
            n += 1
    return n


async def test_concurrent_reloads_start_one_runner_per_family(make_app, provisioned: Path,  # noqa: F811
                                                              smollm2_q4_0_path: Path) -> None:
    app = await make_app()
    services = app.app[SERVICES]
    store = ModelStore(provisioned)
    v = await asyncio.to_thread(store.add_file, smollm2_q4_0_path, "bay")
    applier = services.updates.applier
    await asyncio.gather(*(applier.reload() for _ in range(3)))
    assert sorted(services.scheduler.runners) == ["bay", "smollm2"]
    async with asyncio.timeout(60):
        while (await models(app)).get("bay") != "ready":
            await asyncio.sleep(0.1)
    assert _workers_for(store.blob_path(v.digest)) == 1


async def test_current_watch_survives_its_own_errors(make_app, provisioned: Path, tmp_path: Path,  # noqa: F811
                                                     keyring, smollm2_q4_0_path: Path) -> None:  # noqa: F811
    app = await make_app()
    watch = app.app[SERVICES].updates.current_watch
    watch.interval = 0.2
    await watch.stop()
    await watch.start()
    current = provisioned / "current"
    os.symlink("releases/not-a-number", current)  # current_target() raises on this
    await asyncio.sleep(1.0)  # several ticks fail
    assert watch._task is not None and not watch._task.done()
    current.unlink()
    # `atoll import` from a shell (another SyncManager on the same state dir)
    b = bundle(tmp_path, keyring, "b1", 1, {"bay": [smollm2_q4_0_path]})
    res = await SyncManager(provisioned, SyncConfig(headroom_bytes=1024)).import_bundle(b)
    assert res.status == "installed"
    async with asyncio.timeout(60):
        while "bay" not in await models(app):
            await asyncio.sleep(0.1)
