"""The per-run process supervisor with real child processes: restart with backoff, stop, and no orphans."""

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omi.coordinator import supervisor
from omi.coordinator.supervisor import Launch, RunProcesses
from processes import wait_until

pytestmark = pytest.mark.timeout(60)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def group(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def test_a_child_that_dies_is_started_again_after_a_growing_backoff(monkeypatch):
    monkeypatch.setattr(supervisor, "FIRST_BACKOFF", 0.2)
    starts = []
    dying = RunProcesses("dier", lambda run_id: Launch(["sh", "-c", "exit 3"]), interval=0.05,
                         started=lambda run_id, process: starts.append(time.monotonic()))
    try:
        dying.start("r")
        wait_until(lambda: len(starts) >= 4, 20, "four starts", interval=0.05)
    finally:
        dying.shutdown()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.8, gaps  # 0.2 s, doubled at each death in a row


def test_a_run_no_longer_wanted_has_its_child_and_what_it_forked_stopped():
    wanted = ["r"]
    # a child that ignores SIGTERM and forks: SIGKILL to its process group after the grace ends both
    stubborn = RunProcesses("stubborn", lambda run_id: Launch(["sh", "-c", "trap '' TERM; sleep 60 & sleep 60"]),
                            wanted=lambda: wanted, grace=0.5, interval=0.05)
    try:
        process = wait_until(lambda: stubborn.process("r"), 10, "the wanted run's child", interval=0.05)
        wait_until(lambda: len(group(process.pid)) == 3, 10, "the child and its two sleeps", interval=0.05)
        wanted.clear()
        wait_until(lambda: stubborn.process("r") is None, 10, "the child stopped", interval=0.05)
        assert process.returncode == -signal.SIGKILL
        assert group(process.pid) == []
        assert stubborn.start("r") is not None  # wanted again: started again
    finally:
        stubborn.shutdown()
    assert group(process.pid) == []


COORDINATOR = """
import sys, time
from omi.coordinator.supervisor import Launch, RunProcesses
sleepers = RunProcesses("sleeper", lambda run_id: Launch(["sleep", "60"]))
print(sleepers.start("r").pid, flush=True)
time.sleep(60)
"""


@pytest.mark.slow  # the coordinator stand-in imports omi.swarm (hivemind, torch): 5 to 25 s
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_the_children_of_a_coordinator_killed_by_sigkill_end_with_it():
    coordinator = subprocess.Popen([sys.executable, "-c", COORDINATOR], stdout=subprocess.PIPE, text=True)
    child = int(coordinator.stdout.readline())
    try:
        assert alive(child)
        os.kill(coordinator.pid, signal.SIGKILL)
        coordinator.wait()
        wait_until(lambda: not alive(child), 10, "the orphan ending", interval=0.05)
    finally:
        coordinator.kill()
        if alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_child_gets_its_stdin_line_once_ready_and_end_of_file_when_there_is_none(tmp_path):
    # the checkpointer starts beside the run's bootstrap peer and is handed its addresses once that peer listens
    ready, logs = [], {"late": tmp_path / "late.log", "none": tmp_path / "none.log"}

    def line(run_id: str) -> str:
        wait_until(lambda: ready, 10, "the line", interval=0.05)
        if run_id == "none":
            raise RuntimeError("the bootstrap peer is restarting")
        return '["/ip4/127.0.0.1/tcp/1"]'

    readers = RunProcesses("reader", lambda run_id: Launch(
        [sys.executable, "-c", "import sys; print(repr(sys.stdin.readline()), flush=True)"], log=logs[run_id],
        stdin=lambda: line(run_id)), interval=0.05)
    try:
        processes = [readers.start(run_id) for run_id in logs]
        time.sleep(0.5)
        assert all(process.poll() is None for process in processes)  # it waits for its line
        ready.append(True)
        for process in processes:
            process.wait(10)
    finally:
        readers.shutdown()
    # (a child that ended is started again after the backoff: each start printed the same)
    assert set(logs["late"].read_text().splitlines()) == {"'[\"/ip4/127.0.0.1/tcp/1\"]\\n'"}
    assert set(logs["none"].read_text().splitlines()) == {"''"}  # end of file: the checkpointer exits, restarts
