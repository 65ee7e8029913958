"""Where a command's CPU time goes, by kind of process: run COMMAND, sample /proc, print CPU seconds per kind.

    python scripts/cpu_by_process.py -- make test
    python scripts/cpu_by_process.py --each -- .venv/bin/python -m pytest -q tests/test_churn.py -m slow

The suite's processes die by SIGKILL of their process groups, and a killed process's parent is often killed with
it: ``time`` then never counts their CPU (fresh clone, 2026-12-08: ``time make test`` said 17:47 of CPU in 16:35 of
wall on 2 cores, while /proc/stat said the cores were busy). This reads every process's own counters instead
(``utime + stime`` of /proc/PID/stat) each ``--interval`` seconds; a process that lives less than one interval, and
the last interval of each process, are missed: the line "not attributed" is the machine's busy time (/proc/stat)
that no sampled process accounts for, which includes other work on the machine.

A process's kind is read from its command line when first seen (a fork keeps its parent's: the hivemind DHT and
averager processes of a volunteer count as the volunteer's kind, and the commands tests/zygote.py forks count as
"zygote fork"); ``--each`` lists every process of more than a CPU-second with its parent's pid, which tells a
process's own work from its forks'.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter

# (substring of the command line, kind): the first that matches names the process
KINDS = (
    ("p2pd", "libp2p daemon (p2pd)"),
    ("chromium", "chromium"),
    ("chromedriver", "chromium"),
    ("postgres", "postgresql"),
    ("omi-node validate", "built-in validator"),
    ("checkpointer import main", "checkpointer (witness)"),
    ("bootstrap import main", "swarm bootstrap peer"),
    ("zygote.py", "zygote fork (test volunteers, coordinators)"),
    ("omi-coordinator serve", "coordinator"),
    ("omi-node join", "volunteer"),
    ("omi-node", "omi-node (other commands)"),
    ("omi-coordinator", "omi-coordinator (other commands)"),
    ("pytest", "pytest (in-process tests)"),
    ("import sys;exec(eval(sys.stdin.readline()))", "pytest-xdist worker (in-process tests)"),  # execnet's bootstrap
    ("pip", "pip"),
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def kind_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    if not command:
        return None  # a kernel thread
    return next((kind for needle, kind in KINDS if needle in command), "other: " + command[:50])


def cpu_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def busy_ticks() -> int:
    """The machine's busy time since boot (every core): /proc/stat's cpu line less idle and iowait."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between two samples (default 1)")
    parser.add_argument("--each", action="store_true", help="also list each process of more than a second")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    here = os.getpid()
    seen: dict[int, list] = {}  # pid -> [kind, ticks when first seen, ticks when last seen]
    seen_parent: dict[int, int | None] = {}  # pid -> its parent's pid, when first seen
    busy_before, started = busy_ticks(), time.monotonic()
    child = subprocess.Popen(command)
    while True:
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == here:
                continue
            pid = int(entry)
            ticks = cpu_ticks(pid)
            if ticks is None:
                continue
            if pid not in seen:
                kind = kind_of(pid)
                if kind is None:
                    continue
                # what it used before this run started is not this run's (a process started since has used little)
                seen_parent[pid] = parent_of(pid)
                seen[pid] = [kind, ticks if time.monotonic() - started < args.interval else 0, ticks]
            seen[pid][2] = ticks
        if child.poll() is not None:
            break
        time.sleep(args.interval)
    wall, busy = time.monotonic() - started, (busy_ticks() - busy_before) / CLOCK_TICKS
    by_kind = Counter()
    for kind, first, last in seen.values():
        by_kind[kind] += (last - first) / CLOCK_TICKS
    attributed = sum(by_kind.values())
    cores = os.cpu_count() or 1
    print(f"\n{' '.join(command)}: exit code {child.returncode}, {wall:.0f} s of wall time; the machine was busy "
          f"{busy:.0f} CPU-seconds ({busy / wall / cores:.0%} of {cores} cores)", file=sys.stderr)
    for kind, seconds in by_kind.most_common():
        if seconds >= 0.5:
            print(f"{seconds:9.1f} s  {seconds / max(busy, 1e-9):6.1%}  {kind}", file=sys.stderr)
    if args.each:
        for pid, (kind, first, last) in sorted(seen.items(), key=lambda item: item[1][1] - item[1][2]):
            if (last - first) / CLOCK_TICKS >= 1.0:
                print(f"{(last - first) / CLOCK_TICKS:9.1f} s  pid {pid} (parent {seen_parent.get(pid)}): {kind}",
                      file=sys.stderr)
    print(f"{busy - attributed:9.1f} s  {(busy - attributed) / max(busy, 1e-9):6.1%}  not attributed", file=sys.stderr)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
