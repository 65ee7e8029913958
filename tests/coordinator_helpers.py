"""Helpers for the coordinator tests: a real server on 127.0.0.1 in a background thread, nodes, RunSpecs."""

import asyncio
import functools
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

from omi.coordinator.config import CoordinatorConfig, RegistryConfig, ServerConfig, WorkConfig
from omi.coordinator.server import CoordinatorServer
from omi.dashboard.app import create_app
from omi.models.segments import segment_steps
from omi.node.client import CoordinatorClient
from omi.protos import pb, rpc
from omi.protos.channels import PIN_SEPARATOR, open_channel, parse_target
from omi.protos.clock import now_ms
from omi.protos.peer_ids import new_identity
from omi.protos.signing import generate_key

# A small run: the real digits data (1797 samples, 29 shards of 64), rounds of 8 inner steps (a new identity's
# assignment: one round's share, 8 x 32 = 256 samples = 4 shards), short liveness for the tests.
TEST_RUN = """
[run]
id = "{run_id}"
model = "unet-digits-16"
[data]
source = "builtin:digits"
shard_size = 64
[training]
shards_per_assignment = {shards}
[rounds]
inner_steps = {inner_steps}
[verification]
audit_rate = {audit_rate}
max_strikes = {max_strikes}
[liveness]
heartbeat_timeout = {heartbeat_timeout}
token_ttl = {token_ttl}
"""


def run_toml(run_id: str = "t", *, shards: int = 4, audit_rate: float = 0.0, max_strikes: int = 2,
             heartbeat_timeout: float = 30.0, token_ttl: float = 3600.0, inner_steps: int = 8) -> str:
    return TEST_RUN.format(run_id=run_id, shards=shards, audit_rate=audit_rate, max_strikes=max_strikes,
                           heartbeat_timeout=heartbeat_timeout, token_ttl=token_ttl, inner_steps=inner_steps)


class FakeClock:
    """The coordinator's clocks, moved forward by a test (:meth:`advance`) instead of sleeping past an expiry.

    Called: wall-clock milliseconds (the registry's challenges and tokens); :meth:`monotonic`: seconds (the
    dashboard's reused answers). Both run with real time too, so what a test does not skip takes its real time.
    """

    def __init__(self):
        self.skipped = 0.0  # seconds moved forward so far

    def __call__(self) -> int:
        return now_ms() + int(self.skipped * 1000)

    def monotonic(self) -> float:
        return time.monotonic() + self.skipped

    def advance(self, seconds: float) -> None:
        self.skipped += seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """A CoordinatorServer serving on 127.0.0.1 (any free port) from its own event loop in a thread.

    :param state_dir: state dir (key, admin token, SQLite file)
    :param run: RunSpec TOML created and started before serving (None: no run)
    :param registry: TTLs and rate limits
    :param http: also serve the dashboard, at ``self.http`` (any free port)
    :param records_grace: seconds a node has to hand over audited records (0: the audit window alone decides;
        the lock-step tests move many rounds in a few seconds of wall time)
    :param db_url: the store's SQLAlchemy URL (None: SQLite in the state dir)
    :param grpc_port: where the API listens (0: any free port)
    :param per_address: assignments one source address may hold per round (the lock-step swarms register a dozen
        nodes from 127.0.0.1: 0, no cap)
    :param clock: the coordinator's and dashboard's clocks (None: the real ones)
    """

    def __init__(self, state_dir: Path, run: str | None = None, *, registry: RegistryConfig | None = None,
                 max_message_bytes: int = 4 * 1024 * 1024, http: bool = False, records_grace: float = 0.0,
                 db_url: str | None = None, per_address: int = WorkConfig.max_assignments_per_address,
                 grpc_port: int = 0, clock: FakeClock | None = None):
        http_address = f"127.0.0.1:{free_port()}" if http else None
        self.http = f"http://{http_address}" if http else None
        config = ServerConfig(state_dir=state_dir, db_url=db_url, grpc_address=f"127.0.0.1:{grpc_port}",
                              http_address=http_address,
                              max_message_bytes=max_message_bytes, swarm_host=None,
                              # no history point of its own clock: a test records one where it looks for it (seen on
                              # a loaded machine: a point recorded between a test's two counts of the tables)
                              coordinator=replace(CoordinatorConfig(), registry=registry or RegistryConfig(),
                                                  records_grace=records_grace, work=WorkConfig(per_address),
                                                  metrics_interval=float("inf")))
        http_app = create_app if clock is None else functools.partial(create_app, clock=clock.monotonic)
        self.clock = clock
        self.server = CoordinatorServer(config, http_app=http_app if http else None, clock=clock or now_ms)
        self.coordinator = self.server.coordinator
        self.store = self.coordinator.store
        self.admin_token = self.server.admin_token
        if run is not None:
            self.coordinator.runs.create(run, start=True)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=30)
        self.address = self.server.target  # 127.0.0.1:PORT#sha256:… (TLS, the certificate pinned)
        self.channel = open_channel(self.address)
        self.stub = rpc.CoordinatorStub(self.channel)
        self.admin = rpc.AdminStub(self.channel)
        return self

    def __exit__(self, *exc) -> None:
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.server.stop(grace=0), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def admin_call(self, method: str, request, token: str | None = None):
        metadata = (("authorization", f"Bearer {token or self.admin_token}"),)
        return getattr(self.admin, method)(request, metadata=metadata, timeout=10)

    def node(self, run_id: str = "t", name: str = "", key=None, via: str | None = None) -> CoordinatorClient:
        """A fresh node (new key unless given), registered for ``run_id`` (through the address ``via``, e.g. a
        :class:`SourceRelay`'s, instead of the server's own)."""
        client = CoordinatorClient(via or self.address, key or generate_key(), attempts=1)
        client.register(run_id, new_identity(), display_name=name, swarm_public_key=b"swarm-key")
        return client

    def validator(self, run_id: str = "t", name: str = "validator", *, trusted: bool = True) -> CoordinatorClient:
        """A fresh node, registered for ``run_id`` and granted the validator role (as an admin would); ``trusted``:
        it stands in for the coordinator's own validator (its verdicts decide, no second opinion)."""
        client = self.node(run_id, name)
        self.coordinator.auditor.grant(client.node_id, "test validator")
        if trusted:
            self.coordinator.auditor.trust(client.node_id)
        return client


class TcpRelay:
    """A TCP relay on 127.0.0.1 to ``target`` (``HOST:PORT``, a ``#sha256:`` pin kept in :attr:`address`: TLS runs
    end to end through it). Its connections to the target leave from the loopback address ``source``, so a real
    coordinator sees what a client sends through it as coming from there (gRPC cannot choose a client's source
    address; Linux routes all of 127.0.0.0/8 to the loopback device); the target's answers pass at ``rate`` bytes
    per second (None: at full speed), so a transfer lasts long enough to :meth:`cut`."""

    def __init__(self, target: str, source: str = "127.0.0.1", rate: float | None = None):
        parsed = parse_target(target)
        host, port = parsed.address.rsplit(":", 1)
        self.target, self.source, self.rate = (host, int(port)), source, rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}" + (f"{PIN_SEPARATOR}{parsed.pin}" if parsed.pin else "")
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inbound, _ = self.listener.accept()
            except OSError:  # closed
                return
            outbound = socket.create_connection(self.target, timeout=10, source_address=(self.source, 0))
            outbound.settimeout(None)
            self._sockets += [inbound, outbound]
            for a, b, rate in ((inbound, outbound, None), (outbound, inbound, self.rate)):
                threading.Thread(target=self._pipe, args=(a, b, rate), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket, rate: float | None) -> None:
        try:
            while data := a.recv(16384):
                b.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Drop every connection, with whatever the relay still holds (as a server that dies does)."""
        for s in self._sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        self.cut()


def contribution_for(work: pb.WorkAssignment, spec: pb.RunSpec | None = None, **fields) -> pb.Contribution:
    """A contribution that did all the work of ``work`` (unsigned; the client signs it), with the training-state
    hashes a round commits to (every ``segment_steps`` of the run ``spec``; None: the RunSpec's default)."""
    samples = sum(s.end - s.start for s in work.shards)
    micro_batches = -(-samples // max(1, work.micro_batch_size))
    values = dict(round=work.round, assignment_id=work.assignment_id, samples=samples, mean_loss=0.5,
                  compute_seconds=3.0, params_hash=b"p" * 32, commitment=b"c" * 32,
                  micro_batches=micro_batches, gradient_sketch=[0.1, 0.2])
    segments = -(-micro_batches // segment_steps(spec or pb.RunSpec()))
    values.update(segment_hashes=[bytes([i]) * 32 for i in range(segments + 1)], end_params_hash=b"e" * 32)
    values.update(fields)
    return pb.Contribution(**values)


def trainer(server: ServerThread, folder: Path, run_id: str = "t"):
    """A volunteer's :class:`omi.node.trainer.Trainer`, registered for ``run_id`` with the coordinator ``server``
    (its key and token in ``folder / "node"``): what it asks the coordinator for (work, the run's round and
    published hashes) needs no model, data or swarm."""
    import torch
    from omi.node.session import NodeSession
    from omi.node.trainer import Trainer

    session = NodeSession(server.address, folder / "node", connect_attempts=1)
    spec = session.open(run_id=run_id)
    return Trainer(session, spec, model=torch.nn.Linear(2, 2), scheduler=None, source=None, optimizer=None,
                   params_server=None, micro_batch_size=1)
