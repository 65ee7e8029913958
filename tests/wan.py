"""A WAN on one Linux machine: one network namespace per emulated host, each joined to a bridge by a veth pair whose
two directions are rate-limited with ``tc``'s token bucket filter (tbf).

The root namespace owns the bridge and its address (the *gateway*): a process started there on the gateway address
(a coordinator) is reachable from every host. The bridge switches host-to-host traffic, so a byte from host A to
host B passes A's uplink (tbf on A's side of its veth) and B's downlink (tbf on the bridge's side of B's veth).
netem (delay, loss) is not used: not every kernel we run on has it; tbf is in every one.

Needs root and iproute2 (``ip``, ``tc``); :func:`unavailable` says why not. Every name an instance creates starts
with its tag, ``omw<owner pid, hex>x<counter>``, so two harnesses (in one process or two) never collide, and
:func:`sweep` (run by every :func:`wan`) can tell the leftovers of a process that died from the live ones.

>>> with wan(3, rate_mbit=50) as net:  # doctest: +SKIP
...     coordinator = subprocess.Popen(["omi-coordinator", "serve", "--grpc", f"{net.gateway}:50051", ...])
...     nodes = [subprocess.Popen(host.argv("omi-node", "join", "-c", f"{net.gateway}:50051", "--host", host.ip))
...              for host in net.hosts]
...     net.hosts[0].limit(5)  # one volunteer on a slow line from now on
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

logger = logging.getLogger(__name__)

PREFIX = "omw"
NETWORK = ipaddress.ip_network("10.77.0.0/16")  # each instance takes one /24 of it: 10.77.S.1 bridge, .2… hosts
# TAG then a role: "br" the bridge, "v<i>" host i's veth in the root namespace, "n<i>" host i's namespace
_NAME = re.compile(rf"^{PREFIX}(?P<pid>[0-9a-f]+)x(?P<k>\d+)(?P<role>br|v\d+|n\d+)$")
_LOCK = os.path.join(tempfile.gettempdir(), "omi-wan.lock")  # serialises subnet choice and sweeping
_COUNTER = itertools.count()
MAX_HOSTS = 99  # interface names have at most 15 characters: "omw" + 6 hex pid digits + "x" + 2 digits + "v99"
QUEUE_MS = 50.0  # tbf queue: packets that would wait longer than this are dropped (a router's buffer)


class WanError(RuntimeError):
    """An ``ip`` or ``tc`` command failed (its stderr is in the message)."""


def unavailable() -> str:
    """Why this machine cannot build a WAN ('' when it can): a reason fit for ``pytest.skip``."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    return f"iproute2 missing: {', '.join(missing)} not found" if missing else ""


def _run(*args: str, check: bool = True) -> str:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise WanError(f"{' '.join(map(str, args))}: {result.stderr.strip() or f'exit {result.returncode}'}")
    return result.stdout


def _tbf(netns: list[str], dev: str, rate_mbit: float | None, queue_ms: float) -> None:
    """Set (``rate_mbit=None``: remove) the egress rate of ``dev``; ``netns`` is ``["-n", NAME]`` or ``[]``."""
    if rate_mbit is None:
        _run("tc", *netns, "qdisc", "del", "dev", dev, "root", check=False)  # fails when already unlimited
        return
    assert rate_mbit > 0, f"rate_mbit must be positive, got {rate_mbit}"
    # the bucket must hold at least one timer tick of traffic (10 ms at HZ=100), and a few full-size packets
    burst = max(int(rate_mbit * 1e6 / 8 / 100), 32 * 1024)
    _run("tc", *netns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
         "burst", str(burst), "latency", f"{queue_ms}ms")


def _pids(netns: str) -> list[int]:
    return [int(p) for p in _run("ip", "netns", "pids", netns, check=False).split()]


@dataclass(frozen=True)
class Host:
    """One emulated machine: a network namespace whose ``eth0`` is plugged into the WAN's bridge.

    :param name: the namespace (``ip netns exec NAME …``)
    :param ip: its address on the bridge
    :param link: its veth's end in the root namespace (a port of the bridge)
    """

    name: str
    ip: str
    link: str

    def argv(self, *command) -> list[str]:
        """``command`` run inside this host: ``["ip", "netns", "exec", name, *command]``."""
        return ["ip", "netns", "exec", self.name, *map(str, command)]

    def limit(self, rate_mbit: float | None, *, queue_ms: float = QUEUE_MS) -> None:
        """Cap this host's uplink and downlink at ``rate_mbit`` each (``None``: unlimited)."""
        _tbf(["-n", self.name], "eth0", rate_mbit, queue_ms)  # uplink
        _tbf([], self.link, rate_mbit, queue_ms)  # downlink: the bridge sends into the veth

    def pids(self) -> list[int]:
        """Processes running inside this host."""
        return _pids(self.name)


@dataclass(frozen=True)
class Wan:
    """What :func:`wan` built.

    :param tag: the prefix of every namespace and interface name of this instance
    :param bridge: the bridge in the root namespace
    :param gateway: the bridge's address: processes in the root namespace listen here to serve the hosts
    :param hosts: one per namespace, the i-th at address ``.(i + 2)``
    """

    tag: str
    bridge: str
    gateway: str
    hosts: list[Host]


def leftovers(tag: str | None = None) -> list[str]:
    """Namespaces and root-namespace interfaces of the harness instance ``tag`` (``None``: of any instance)."""
    names = [line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.strip()]
    names += [line.split(":")[1].strip().split("@")[0] for line in _run("ip", "-o", "link", "show").splitlines()]
    return [n for n in names if (m := _NAME.match(n)) and tag in (None, n[:m.start("role")])]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(netns: str, timeout: float = 10.0) -> None:
    """SIGKILL every process in ``netns`` and wait until none is left (a live process keeps the namespace)."""
    deadline = time.monotonic() + timeout
    while pids := _pids(netns):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            logger.warning("processes %s in namespace %s survived SIGKILL", pids, netns)
            return
        time.sleep(0.05)


def _remove(names: list[str]) -> None:
    """Delete these namespaces (after killing what runs inside) and interfaces; absent ones are skipped."""
    roles = {n: _NAME.match(n)["role"][0] for n in names}
    for netns in [n for n in names if roles[n] == "n"]:
        _kill_inside(netns)
    # a veth pair goes with either end; deleting the root end first also frees a namespace a process still holds
    for link in [n for n in names if roles[n] == "v"]:
        _run("ip", "link", "del", link, check=False)
    for netns in [n for n in names if roles[n] == "n"]:
        _run("ip", "netns", "del", netns, check=False)
    for bridge in [n for n in names if roles[n] == "b"]:
        _run("ip", "link", "del", bridge, check=False)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    with open(_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def sweep() -> list[str]:
    """Remove what harnesses of processes that are gone left behind (a run killed before its clean-up); return
    the names removed. The harnesses of live processes are left alone."""
    with _locked():
        dead = [n for n in leftovers() if not _alive(int(_NAME.match(n)["pid"], 16))]
        _remove(dead)
    if dead:
        logger.info("removed the leftovers of earlier runs: %s", dead)
    return dead


def _free_subnet() -> ipaddress.IPv4Network:
    used = {ipaddress.ip_interface(word).network for line in _run("ip", "-o", "-4", "addr", "show").splitlines()
            for word in line.split() if "/" in word and word[0].isdigit()}
    for subnet in NETWORK.subnets(new_prefix=24):
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise WanError(f"no free /24 left in {NETWORK}")


@contextlib.contextmanager
def wan(n: int, rate_mbit: float | None = 100.0, *, queue_ms: float = QUEUE_MS) -> Iterator[Wan]:
    """``n`` hosts in namespaces on one bridge, each link capped at ``rate_mbit`` in each direction.

    On exit (also when the body raises) every process still running in a host is killed and the namespaces, veths
    and bridge are deleted. Leftovers of crashed earlier runs are swept first (:func:`sweep`).

    :param n: hosts, 1 to 99
    :param rate_mbit: each host's uplink and downlink rate in Mbit/s (``None``: unlimited; change it later with
      :meth:`Host.limit`)
    :param queue_ms: the longest a packet waits in a link's queue before it is dropped
    """
    if reason := unavailable():
        raise WanError(reason)
    if not 1 <= n <= MAX_HOSTS:
        raise ValueError(f"n must be 1 to {MAX_HOSTS}, got {n}")
    sweep()
    tag = f"{PREFIX}{os.getpid():x}x{next(_COUNTER) % 100}"
    bridge = f"{tag}br"
    names = [bridge]
    try:
        with _locked():  # two harnesses starting at once must not pick the same subnet
            subnet = _free_subnet()
            gateway = f"{subnet[1]}"
            _run("ip", "link", "add", bridge, "type", "bridge", "forward_delay", "0")
            _run("ip", "addr", "add", f"{gateway}/{subnet.prefixlen}", "dev", bridge)
            _run("ip", "link", "set", bridge, "up")
        hosts = []
        for i in range(n):
            host = Host(name=f"{tag}n{i}", ip=f"{subnet[i + 2]}", link=f"{tag}v{i}")
            names += [host.name, host.link]
            _run("ip", "netns", "add", host.name)
            # the namespace's end is created inside it, as eth0: no name can clash there
            _run("ip", "link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.name)
            _run("ip", "link", "set", host.link, "master", bridge, "up")
            _run("ip", "-n", host.name, "link", "set", "lo", "up")
            _run("ip", "-n", host.name, "addr", "add", f"{host.ip}/{subnet.prefixlen}", "dev", "eth0")
            _run("ip", "-n", host.name, "link", "set", "eth0", "up")
            _run("ip", "-n", host.name, "route", "add", "default", "via", gateway)
            if rate_mbit is not None:
                host.limit(rate_mbit, queue_ms=queue_ms)
            hosts.append(host)
        yield Wan(tag=tag, bridge=bridge, gateway=gateway, hosts=hosts)
    finally:
        with _locked():
            _remove(names)
        if left := leftovers(tag):
            logger.warning("could not remove %s", left)
