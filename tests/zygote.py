"""A pre-imported Python that forks the real commands for the multi-process tests (a "zygote", as Android's).

Starting ``omi-node join`` costs 7-10 s of CPU before its first line (torch, hivemind, diffusers with torch._dynamo
and every diffusers transformer), on 2 cores shared with the swarm the test already runs; the slow tests start about
fifty. This process imports those modules once; each command is then a fork of it that runs the command's own entry
point (``omi.node.cli:app``, ``omi.coordinator.cli:app``, ``python -m tests.adversaries``) with its own argv,
environment, working directory, standard streams and session, and exits with that entry point's exit code, as the
console script would. What differs from a fresh interpreter is only what was imported before ``main`` ran; tests that
check a command's start-up (bad input, ``omi-node download``, the admin CLI) still start the console scripts.

``python tests/zygote.py SOCKET``: serves on the Unix socket SOCKET until its stdin closes. Each request is one JSON
line (``target``, ``argv``, ``env``, ``cwd``, ``netns``: a network namespace to enter first) with the child's stdin,
stdout and stderr passed as file descriptors; the reply is a line with the child's pid, and later a line with its
exit status (``os.waitstatus_to_exitcode``).
"""

from __future__ import annotations

import faulthandler
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
# what the commands import before their first line (the trainer, the validator and the coordinator's own modules)
PRELOAD = ("omi.node.cli", "omi.node.volunteer", "omi.node.trainer", "omi.node.validator", "omi.coordinator.cli",
           "omi.coordinator.server", "omi.dashboard.app", "diffusers.models.unets.unet_2d")
MAX_REQUEST = 1 << 20


def _process_locks() -> list[tuple[object, str]]:
    """Where the preloaded modules keep a ``multiprocessing`` lock made at import (hivemind's ``MPFuture`` and
    ``SharedBytes`` locks): (module or class, attribute name).

    Such a lock is a semaphore that every fork shares. A fresh interpreter makes its own, shared only with the
    processes it forks itself; inherited from the zygote, one lock would be shared by every command of the session,
    and a command killed while holding it (``kill -9`` of a volunteer in the middle of an ``MPFuture`` update) would
    leave it held for good: every volunteer forked after it then waited without end for its DHT to start (seen on CI,
    all of one xdist worker's later volunteers). Each child makes fresh ones (``_fresh_process_locks``). A shared
    synchronization object of any other kind (an event, a semaphore, a shared value) is refused here, at start."""
    import multiprocessing.sharedctypes
    import multiprocessing.synchronize as synchronize

    shared = (synchronize.SemLock, synchronize.Condition, synchronize.Event, synchronize.Barrier,
              multiprocessing.sharedctypes.SynchronizedBase)
    found = []
    with warnings.catch_warnings():  # reading a deprecated name's __module__ warns (torch.distributed.reduce_op)
        warnings.simplefilter("ignore")
        for module in list(sys.modules.values()):
            owners = [module, *(value for value in vars(module).values()
                                if isinstance(value, type) and value.__module__ == module.__name__)]
            found += [(owner, name) for owner in owners for name, value in list(vars(owner).items())
                      if isinstance(value, shared)]
    for owner, name in found:
        if type(vars(owner)[name]) not in (synchronize.Lock, synchronize.RLock):
            raise RuntimeError(f"{owner!r}.{name} is a shared {type(vars(owner)[name]).__name__} made at import; the "
                               "zygote can only give each command fresh locks")
    return found


def _fresh_process_locks(locks: list[tuple[object, str]]) -> None:
    """In the forked child: replace each lock of ``_process_locks`` by a new one of the same kind, as the command's
    own imports would have made it."""
    import multiprocessing

    for owner, name in locks:
        kind = type(vars(owner)[name]).__name__  # Lock or RLock
        setattr(owner, name, getattr(multiprocessing, kind)())


PROCESS_LOCKS: list[tuple[object, str]] = []  # filled by serve() once the modules are imported


def _run_child(request: dict, fds: list[int]) -> int:
    """In the forked child: become the command, run it, return its exit code."""
    os.setsid()  # its own session: a test kills the whole "machine" with killpg, as a console script's
    _fresh_process_locks(PROCESS_LOCKS)
    if request.get("netns"):  # a host of tests/wan.py: its network, as `ip netns exec NAME` gives it
        _enter_network_namespace(request["netns"])
    for target_fd, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target_fd)
        os.close(fd)
    faulthandler.enable()  # a crash in native code leaves its Python stack in the command's log
    # the dispositions a fresh interpreter starts with. SIGPIPE stays ignored, as Python sets it at start-up (a write
    # to a closed pipe raises BrokenPipeError): at SIG_DFL a volunteer leaving the swarm died of SIGPIPE once, silently
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = list(request["argv"])
    _reseed()
    target = request["target"]
    try:
        if target.startswith("module:"):  # python -m MODULE
            import runpy

            sys.path.insert(0, request["cwd"])
            runpy.run_module(target.removeprefix("module:"), run_name="__main__", alter_sys=True)
        else:  # a console script: package.module:callable
            import importlib

            module, name = target.split(":")
            getattr(importlib.import_module(module), name)()
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1


CLONE_NEWNET = 0x40000000  # from <sched.h>


def _enter_network_namespace(name: str) -> None:
    """Move this process into the named network namespace (``ip netns add NAME``; root)."""
    import ctypes

    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into network namespace {name}")
    finally:
        os.close(fd)


def _reseed() -> None:
    """Every child starts from the zygote's random state: draw fresh seeds as a new interpreter would (Python's
    ``random`` reseeds itself after a fork; numpy's and torch's global generators do not)."""
    import numpy
    import torch

    numpy.random.seed(int.from_bytes(os.urandom(4), "little"))
    torch.seed()


def _child(request: dict, fds: list[int]) -> None:
    code = 1
    try:
        code = _run_child(request, fds)
    finally:
        try:
            import atexit

            atexit._run_exitfuncs()  # what the interpreter runs at exit (hivemind and logging register there)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(path: str) -> None:
    for module in PRELOAD:
        __import__(module)
    assert threading.active_count() == 1, f"a preloaded module started threads: {threading.enumerate()}"
    PROCESS_LOCKS.extend(_process_locks())
    names = ", ".join(f"{getattr(owner, '__qualname__', getattr(owner, '__name__', owner))}.{name}"
                      for owner, name in PROCESS_LOCKS)
    print(f"{time.strftime('%H:%M:%S')} each command gets fresh locks for: {names}", file=sys.stderr, flush=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    children: dict[int, socket.socket] = {}
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [], 0.05)
        if sys.stdin in readable and not sys.stdin.readline():
            break  # the test session ended
        if listener in readable:
            connection, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(connection, MAX_REQUEST, 3)
            pid = os.fork()
            if pid == 0:
                for own in (listener, connection, *children.values()):
                    own.close()
                _child(json.loads(message), fds)
            for fd in fds:
                os.close(fd)
            connection.sendall(f"{pid}\n".encode())
            print(f"{time.strftime('%H:%M:%S')} pid {pid} started: {json.loads(message)['argv'][:4]}", file=sys.stderr,
                  flush=True)
            children[pid] = connection
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = children.pop(pid, None)
            print(f"{time.strftime('%H:%M:%S')} pid {pid} ended: {os.waitstatus_to_exitcode(status)}", file=sys.stderr,
                  flush=True)
            if connection is not None:
                try:
                    connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass
                connection.close()
    for pid in children:  # the session is over: no command outlives it
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Forked:
    """A command the zygote forked, with the part of ``subprocess.Popen``'s interface the tests use."""

    def __init__(self, connection: socket.socket, args: list[str]):
        self._connection, self.args = connection, args
        self._buffer = b""
        self.pid = int(self._read_line(timeout=30))
        self.returncode: int | None = None

    def _read_line(self, timeout: float | None) -> str | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self._connection], [], [], left)
            if not readable:
                return None
            chunk = self._connection.recv(4096)
            if not chunk:
                raise RuntimeError("the zygote went away")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def poll(self) -> int | None:
        if self.returncode is None:
            line = self._read_line(timeout=0)
            if line is not None:
                self.returncode = int(line)
                self._connection.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            line = self._read_line(timeout)
            if line is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = int(line)
            self._connection.close()
        return self.returncode

    def send_signal(self, number: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, number)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The zygote process of this pytest process, started on first use (about 10 s of imports, once)."""

    def __init__(self, env: dict):
        self.path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"omi-zygote-{os.getpid()}-{time.monotonic_ns()}")
        with open(f"{self.path}.log", "ab") as log:  # which command started and ended when, with its exit code
            self.proc = subprocess.Popen([sys.executable, str(HERE / "zygote.py"), self.path], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, cwd=HERE, env=env)
        ready = self.proc.stdout.readline()
        if ready.strip() != b"ready":
            self.proc.kill()
            raise RuntimeError(f"the zygote did not start (exit code {self.proc.wait()})")

    def spawn(self, target: str, argv: list[str], *, stdin: int, stdout: int, stderr: int, env: dict,
              cwd: str, netns: str | None = None) -> Forked:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(self.path)
        request = json.dumps(dict(target=target, argv=argv, env=env, cwd=cwd, netns=netns)).encode()
        socket.send_fds(connection, [request], [stdin, stdout, stderr])
        return Forked(connection, argv)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if os.path.exists(self.path):
            os.unlink(self.path)


if __name__ == "__main__":
    serve(sys.argv[1])
