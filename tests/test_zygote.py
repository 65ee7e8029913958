"""The zygote that forks the slow tests' commands (tests/zygote.py) gives each command what a fresh interpreter has."""

import signal
import sys
import time

import pytest
from processes import _popen, wait_until


def take_hivemind_lock():
    """Run as a command the zygote forks (``sys.argv[1]``: ``hold`` or ``try``): hold hivemind's ``MPFuture`` update
    lock until killed, or exit 0 if it can be taken within 10 s (3 if not)."""
    from hivemind.utils.mpfuture import MPFuture

    if sys.argv[1] == "hold":
        MPFuture._update_lock.acquire()
        print("holding the lock", flush=True)
        time.sleep(600)
    sys.exit(0 if MPFuture._update_lock.acquire(timeout=10) else 3)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_command_killed_holding_a_hivemind_lock_does_not_block_the_next_command(tmp_path):
    # a command killed by `kill -9` in the middle of an MPFuture update (a volunteer killed in a churn test) held the
    # zygote's one copy of the lock for good: every volunteer forked after it waited without end for its DHT
    holder = _popen("test_zygote:take_hivemind_lock", ["hold-lock", "hold"], tmp_path / "holder.log")
    wait_until(lambda: "holding the lock" in (tmp_path / "holder.log").read_text(), 60, "the lock taken")
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=30) == -signal.SIGKILL

    taker = _popen("test_zygote:take_hivemind_lock", ["take-lock", "try"], tmp_path / "taker.log")
    assert taker.wait(timeout=60) == 0, (tmp_path / "taker.log").read_text()
