"""One side of the store race test: `add` adds GGUF files with `atoll models add`'s code,
`import` imports signed bundles (each ends in garbage collection and staging clean-up).

usage: python -m tests.sync.race_child add STATE_DIR FILE...
       python -m tests.sync.race_child import STATE_DIR BUNDLE_DIR...
Exits 0 when every step succeeded, 1 with the traceback on stderr otherwise.
"""

from __future__ import annotations

import asyncio
import sys
import traceback

from runtime.store import ModelStore
from sync.apply import SyncManager
from sync.errors import ImportInProgress
from sync.verify import SyncConfig


async def _imports(state: str, bundles: list[str]) -> None:
    mgr = SyncManager(state, SyncConfig(headroom_bytes=1024))
    for b in bundles:
        while True:
            try:
                res = await mgr.import_bundle(b)
                break
            except ImportInProgress:  # the other side's start-up recovery holds the sync lock
                await asyncio.sleep(0.01)
        assert res.status == "installed", res


def main() -> int:
    mode, state, *items = sys.argv[1:]
    try:
        if mode == "add":
            store = ModelStore(state)
            for i, f in enumerate(items):
                store.add_file(f, family=f"local{i}")
        else:
            asyncio.run(_imports(state, items))
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
