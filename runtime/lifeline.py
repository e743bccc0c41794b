"""A worker never outlives the daemon that started it, even when the daemon is SIGKILLed.

The daemon puts its pid in ``ATOLL_WORKER_PARENT``; the worker asks the kernel for SIGKILL when
its parent dies (``prctl(PR_SET_PDEATHSIG)``), then checks the parent is still the one it was
started by (it may have died before the prctl). The closed stdin pipe would also end an idle
worker, but not one loading a model or processing a long prompt, which do not read it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger(__name__)

PARENT_ENV = "ATOLL_WORKER_PARENT"
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Arrange SIGKILL on parent death (Linux); exit at once if the parent is already gone."""
    parent = os.environ.get(PARENT_ENV)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    if parent and parent.isdigit() and os.getppid() != int(parent):
        log.error("parent %s is gone before the worker started: exiting", parent)
        os._exit(1)
