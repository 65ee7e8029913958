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
    if not signal_when_parent_dies():
        exit_when_orphaned(parent)
    if os.getppid() != parent:
        os._exit(1)


def signal_when_parent_dies(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send this process ``sig`` when its parent (the thread that forked it) dies; False where it
    cannot (not Linux). Safe in a ``subprocess.Popen`` ``preexec_fn``."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def exit_when_orphaned(parent: int, message: str = "") -> None:
    """A daemon thread that ends this process (exit code 1, ``message`` logged) once ``parent`` is no longer its
    parent (the fallback of :func:`end_with_parent` where prctl is missing)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        if message:
            logger.warning("%s", message)
        os._exit(1)

    threading.Thread(target=watch, name="exit_when_orphaned", daemon=True).start()
