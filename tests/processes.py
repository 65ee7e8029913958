"""Real omi processes for tests: `omi-coordinator serve` and `omi-node join` as subprocesses on 127.0.0.1.

Each process runs in its own session (process group), so a test can kill one "machine" whole with SIGKILL —
the main process, hivemind's forked DHT and averager processes and the libp2p daemon — as a crash would.
Every wait is bounded; `reap_all()` kills whatever a test left running.
"""

import atexit
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import grpc
import tomli_w
from coordinator_helpers import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from omi.coordinator.credentials import TLS_CERT_FILENAME
from omi.protos import pb
from omi.protos.channels import open_channel, pinned
from zygote import Forked, Zygote

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "runs" / "digits.toml"
_STARTED: list[Forked | subprocess.Popen] = []
# one torch thread per process (several share 2 cores); unbuffered, so a killed process's log is complete
PROCESS_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}



def sized_run(run_file: Path = DIGITS, **sections: dict) -> str:
    """The shipped run file ``run_file`` as TOML text with the keys of ``sections`` (section -> {key: value})
    replaced: what a test changes of the run users run is exactly what it passes here."""
    doc = tomllib.loads(run_file.read_text())
    for section, values in sections.items():
        doc.setdefault(section, {}).update(values)
    return tomli_w.dumps(doc)


# The digits run users run (examples/runs/digits.toml: rounds, top-k 5 % 8-bit, the witness, audits), sized for
# 2 shared cores: rounds of 4 inner steps, short matchmaking, frequent heartbeats (a departure is noticed in 6 s).
FAST = dict(
    rounds=dict(inner_steps=4),
    averaging=dict(matchmaking_time=2.0, averaging_timeout=20.0),
    liveness=dict(heartbeat_interval=1.0, heartbeat_timeout=6.0, token_ttl=600.0),
)
# what the tests that do not look at checkpoints give as [checkpoints]: none is drawn (each costs the checkpointer a
# 16-image preview on the same 2 cores)
NO_CHECKPOINTS = dict(every_rounds=100000)


def fast_run(**sections: dict) -> str:
    """:data:`FAST`'s digits run with more keys replaced (section -> {key: value}), as TOML text."""
    return sized_run(**{name: {**FAST.get(name, {}), **sections.get(name, {})} for name in {*FAST, *sections}})


def _popen(target: str, args: list, log: Path, env: dict | None = None, cwd: Path | None = None,
           netns: str | None = None) -> Forked:
    """Run a command (``target``: its entry point, as :meth:`Zygote.spawn` takes it; ``args``: its argv) in its own
    session with its output in ``log`` (in the network namespace ``netns``, if given): forked from this session's
    zygote (tests/zygote.py), which imported what it imports once."""
    with open(log, "ab") as out, open(os.devnull, "rb") as nothing:
        process = zygote().spawn(target, [str(a) for a in args], stdin=nothing.fileno(), stdout=out.fileno(),
                                 stderr=out.fileno(), env={**os.environ, **PROCESS_ENV, **(env or {})},
                                 cwd=str(cwd or os.getcwd()), netns=netns)
    _STARTED.append(process)
    return process


def node_in(netns: str, coordinator: str, state_dir: Path, *args, log: Path) -> Forked:
    """``omi-node join`` inside the network namespace ``netns`` (a host of tests/wan.py), output in ``log``."""
    return _popen("omi.node.cli:app", [BIN / "omi-node", "join", "--coordinator", coordinator, "--state-dir",
                                       state_dir, "--quiet", *args], log, netns=netns)


def serve_command(*args, log: Path) -> Forked:
    """``omi-coordinator serve ARGS``, output in ``log`` (:class:`ServeProcess` waits for it, this does not)."""
    return _popen("omi.coordinator.cli:app", [BIN / "omi-coordinator", "serve", *args], log)


_ZYGOTE: list[Zygote] = []


def zygote() -> Zygote:
    """This pytest process's zygote, started on first use and stopped when the process exits."""
    if not _ZYGOTE:
        _ZYGOTE.append(Zygote(env={**os.environ, **PROCESS_ENV}))
        atexit.register(_ZYGOTE[0].close)
    return _ZYGOTE[0]


def cli(*args, env=None) -> subprocess.CompletedProcess:
    """``omi-coordinator ARGS`` (captured, at most a minute)."""
    return subprocess.run([BIN / "omi-coordinator", *map(str, args)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def kill_group(process: Forked | subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (its session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def reap_all() -> None:
    while _STARTED:
        kill_group(_STARTED.pop())


def outlive_the_test(process: Forked | subprocess.Popen) -> None:
    """Leave ``process`` out of the reaping after each test (conftest): a server of a module-scoped fixture, which
    kills it itself."""
    _STARTED.remove(process)


def serving(address: str, state_dir: Path, process: Forked, log: Path) -> str | None:
    """The pinned target of the coordinator at ``address`` (its certificate read from ``state_dir``) once its health
    service says SERVING; None before. Fails if the process exited."""
    assert process.poll() is None, f"serve exited: {log.read_text()}"
    certificate = state_dir / TLS_CERT_FILENAME
    if not certificate.exists():
        return None
    target = pinned(address, certificate.read_bytes())
    try:
        with open_channel(target) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
    except grpc.RpcError:
        return None
    return target if status == health_pb2.HealthCheckResponse.SERVING else None


WITNESS_UP = "joined the swarm as the rounds' witness"  # the checkpointer's line once its swarm peer is up


class ServeProcess:
    """`omi-coordinator serve` in a subprocess, waited for until its health service says SERVING and (``witness``)
    its run's witness joined the swarm: a lone volunteer averages every round with the witness, and one that
    trained before the witness was up waited out its first all-reduce (matchmaking and averaging timeouts)."""

    def __init__(self, state_dir: Path, log: Path, *, run_file: Path = DIGITS, grpc_port: int | None = None,
                 http_port: int | None = None, extra: tuple = (), witness: bool = True):
        self.state_dir, self.log = state_dir, log
        self.grpc_port, self.http_port = grpc_port or free_port(), http_port or free_port()
        listen = f"127.0.0.1:{self.grpc_port}"
        self.http = f"http://127.0.0.1:{self.http_port}"
        # as users start it: with its witness and its built-in validator
        self.proc = _popen("omi.coordinator.cli:app", [
            BIN / "omi-coordinator", "serve", "--state-dir", state_dir, "--grpc", listen, "--http",
            f"127.0.0.1:{self.http_port}", "--run", run_file, *extra], log)
        # the gRPC API's TLS certificate pinned: what nodes get as --coordinator
        self.address = wait_until(lambda: serving(listen, state_dir, self.proc, log), 60, f"serve on {listen}: "
                                  f"{log}", interval=0.1)
        # (a run served without a swarm has no witness)
        if witness and "--swarm-host" not in map(str, extra):
            wait_until(lambda: WITNESS_UP in log.read_text(), 120, f"the run's witness: {log}", interval=0.2)

    def rounds_by_name(self, run_id: str = "digits") -> dict[str, list[int]]:
        """Display name -> the rounds of its contributions the coordinator accepted (from its SQLite file)."""
        with sqlite3.connect(self.state_dir / "coordinator.db") as db:
            rows = db.execute("SELECT n.display_name, c.round FROM contributions c JOIN nodes n "
                              "ON c.node_id = n.node_id WHERE c.run_id = ? ORDER BY c.round", (run_id,)).fetchall()
        rounds: dict[str, list[int]] = {}
        for name, round_number in rows:
            rounds.setdefault(name, []).append(round_number)
        return rounds

    def contributions(self, run_id: str = "digits") -> list[pb.Contribution]:
        """The ledger as stored in the coordinator's SQLite file."""
        with sqlite3.connect(self.state_dir / "coordinator.db") as db:
            rows = db.execute("SELECT message FROM contributions WHERE run_id = ? ORDER BY round", (run_id,))
            return [pb.Contribution.FromString(row[0]) for row in rows]


class NodeProcess:
    """`omi-node join` in a subprocess with its own state dir.

    :param attack: run this adversary of ``tests/adversaries`` instead (``python -m tests.adversaries ATTACK``,
      which parses the same options as ``omi-node join``)
    :param env: environment variables of the process, beside this one's
    """

    def __init__(self, coordinator: str, state_dir: Path, *args, name: str = "", attack: str | None = None,
                 env: dict | None = None):
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.log = state_dir.parent / f"{state_dir.name}.log"
        target, command = ("module:tests.adversaries", [sys.executable, attack]) if attack else \
            ("omi.node.cli:app", [BIN / "omi-node", "join"])
        self.proc = _popen(target, [*command, "--coordinator", coordinator, "--state-dir", state_dir,
                                    "--quiet", "--name", name or state_dir.name, *args], self.log, env=env,
                           cwd=ROOT if attack else None)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.state_dir.name} did not finish in {timeout:.0f} s:\n"
                                 f"{self.log.read_text()[-3000:]}") from None

    def output(self) -> str:
        return self.log.read_text()


def run_node(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    """`omi-node ARGS` to completion (bounded)."""
    return subprocess.run([str(BIN / "omi-node"), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def wait_until(condition, timeout: float, what: str, interval: float = 0.5):
    """Poll ``condition`` until it returns something true (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
