"""Forked processes that end when the process that forked them ends, however it ends (even by SIGKILL)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def end_with_parent(parent: int) -> None:
    """Make this forked process end as soon as ``parent``, the process that forked it, ends.

    Call it first thing in the child. On Linux the kernel sends it SIGKILL when the parent dies
    (``PR_SET_PDEATHSIG``); elsewhere a daemon thread checks every second. A parent that died before the call
    is caught too: the child then has another parent already.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child ends. hivemind forks its DHT and averager
    processes from the main thread (it must), whose end is the process's end.

    >>> class Worker(multiprocessing.Process):  # doctest: +SKIP
    ...     def run(self):
    ...         end_with_parent(multiprocessing.parent_process().pid)
    ...         serve_forever()
    """
    if not _kill_when_parent_dies():
        threading.Thread(target=_exit_when_orphaned, args=(parent,), name="end_with_parent", daemon=True).start()
    if os.getppid() != parent:
        os._exit(1)


def _kill_when_parent_dies() -> bool:
    """Ask the kernel for SIGKILL when this process's parent dies; False where it cannot (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)
