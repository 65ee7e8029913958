"""Stop signals in a process that runs hivemind peers: SIGTERM and SIGINT ask the main loop to stop.

hivemind's averagers set SIGINT to "ignore" in the process that starts them, so a process installs its handlers
again once its swarm peer runs (call what :func:`install_stop_signals` returns). Forked children (DHT,
averagers) inherit Python handlers; in them the signal keeps its default effect, or hivemind's shutdown
(SIGTERM) could not end them.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

logger = logging.getLogger(__name__)


def install_stop_signals(stop: Callable[[], None]) -> Callable[[], None]:
    """Make SIGTERM and SIGINT call ``stop()`` in this process; returns a function that installs them again."""
    main_pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        logger.info("%s received: stopping", signal.Signals(signum).name)
        stop()

    def install() -> None:
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    install()
    return install
