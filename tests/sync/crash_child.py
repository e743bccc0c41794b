"""Run one import in a child process and die (SIGKILL, or a file-size limit) at a named step.

usage: python -m tests.sync.crash_child STATE_DIR STICK STEP [FSIZE_LIMIT]
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys

from sync.apply import SyncManager
from sync.copy import Progress
from sync.errors import ImportFailed
from sync.verify import SyncConfig


def main() -> int:
    state, stick, step = sys.argv[1:4]
    if len(sys.argv) > 4:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of dying
        lim = int(sys.argv[4])
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim))

    def checkpoint(name: str) -> None:
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)

    def progress(p: Progress) -> None:
        if step == "mid-copy" and p.phase == "copying" and p.bytes_done > 5 * (1 << 20):
            os.kill(os.getpid(), signal.SIGKILL)

    mgr = SyncManager(state, SyncConfig(headroom_bytes=1024), checkpoint=checkpoint, on_progress=progress)
    try:
        asyncio.run(mgr.import_bundle(stick))
    except ImportFailed as e:
        print(e.code)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
