"""The blocking-call detector itself: it catches product code blocking the loop, and its allow-list stays narrow."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sync.watch import find_bundles
from tests.blocking import ALLOWED, ROOT, Detections


async def test_product_code_run_by_the_loop_is_caught(blockbuster: Detections, tmp_path: Path) -> None:
    # find_bundles scans directories; it is meant for a thread. Run by the loop itself, it blocks the loop.
    loop = asyncio.get_running_loop()
    ran = loop.create_future()
    loop.call_soon(lambda: ran.set_result(None))
    loop.call_soon(find_bundles, tmp_path, 1)
    loop.call_soon(lambda: None)
    await ran
    await asyncio.sleep(0)  # the callbacks run in order: by now find_bundles has run
    assert any("os.stat" in s and "sync/watch.py" in s and "find_bundles" in s for s in blockbuster.sites), \
        blockbuster.sites
    blockbuster.sites.clear()  # it did its job; do not fail this test at teardown


async def test_a_test_calling_a_helper_itself_is_not_a_finding(blockbuster: Detections, tmp_path: Path) -> None:
    assert find_bundles(tmp_path, 1) == []
    await asyncio.to_thread(find_bundles, tmp_path, 1)
    assert blockbuster.sites == []


def test_allowed_sites_name_functions_that_exist() -> None:
    for (file, function), why in ALLOWED.items():
        source = (ROOT / file).read_text()
        assert f"def {function}(" in source, f"{file}: no function {function} (fixed? then drop its entry)"
        assert why, (file, function)
