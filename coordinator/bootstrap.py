"""The coordinator's hivemind bootstrap peers: one token-gated DHT peer per run, whose addresses go into the RunSpec.

Volunteers join a run's swarm through the ``initial_peers`` of the RunSpec they receive at registration; the
coordinator runs such a peer per run (it never trains and is never on the gradient path). Each peer is a process
of its own (:func:`main`), which :class:`SwarmBootstrap` starts when the run starts and keeps running
(:class:`omi.coordinator.supervisor.RunProcesses`, which also ends it with the coordinator):

    python -c "from omi.coordinator.bootstrap import main; main()" --state-dir state --spec <RunSpec, hex>

hivemind forks its DHT process from the process that creates it, and a fork of the coordinator's process, whose
threads serve gRPC (grpc.aio does not support fork), can crash in the child: the DHT then never comes up and its
creator waits for it forever (seen under load). In a process of its own the DHT is created in a main thread with
no gRPC around, and the coordinator only reads the addresses the process prints, from any thread.

The peer also carries the coordinator's bans into the swarm: every few seconds it reads the peer ids of banned
nodes from the database and publishes a signed revocation for each (:func:`omi.swarm.publish_revocations`), so
averagers refuse them within a minute instead of at their token's expiry.
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from omi.coordinator.errors import Unavailable
from omi.coordinator.store import Ban, PeerBinding, Store, Token, sqlite_url
from omi.coordinator.supervisor import Launch, RunProcesses
from omi.protos import pb, signing
from sqlalchemy import select

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT = 120.0  # seconds the server waits at start for the running runs' peers
REVOCATION_POLL = 5.0  # seconds between two reads of the bans
REVOCATION_REFRESH = 300.0  # seconds between two re-publications of every revocation (peers come and go)


class SwarmBootstrap:
    """Keeps a bootstrap peer process per run (started on demand, restarted if it died) until shutdown.

    :param key: the coordinator's Ed25519 key (its public half goes into the spec the peer checks tokens against;
      the peer process loads the private key from ``state_dir`` to mint its own access token)
    :param state_dir: the coordinator's state dir; a peer's libp2p identity and RSA key live in
      ``state_dir/swarm/<run id>/``, so its peer id (and so the RunSpec's initial peers, up to the port) stays the
      same across restarts
    :param host: address the peers listen on (volunteers must be able to reach it)
    :param db_url: the coordinator's database (None: SQLite under ``state_dir``); the peers read the bans from it
    """

    def __init__(self, key: Ed25519PrivateKey, state_dir: str | Path, host: str = "127.0.0.1",
                 db_url: str | None = None):
        self.public_key, self.state_dir, self.host = signing.public_bytes(key), Path(state_dir), host
        self.db_url = db_url
        self._specs: dict[str, pb.RunSpec] = {}  # run id -> the spec its peer gets
        self._maddrs: dict[str, Future] = {}  # run id -> the multiaddrs its current process prints once it listens
        self.processes = RunProcesses("swarm bootstrap peer", self._launch, started=self._started)

    def start(self, spec: pb.RunSpec) -> None:
        """Start the run's peer process unless it is running (or waits to be restarted); returns at once (any
        thread)."""
        if spec.run_id not in self._specs:
            message = pb.RunSpec()
            message.CopyFrom(spec)
            message.coordinator_public_key = self.public_key
            del message.initial_peers[:]
            self._specs[spec.run_id] = message
        self.processes.start(spec.run_id)

    def _launch(self, run_id: str) -> Launch:
        command = [sys.executable, "-c", "from omi.coordinator.bootstrap import main; main()",
                   "--state-dir", str(self.state_dir), "--host", self.host,
                   "--spec", self._specs[run_id].SerializeToString(deterministic=True).hex()]
        if self.db_url:
            command += ["--db", self.db_url]
        return Launch(command, read_stdout=True)  # its log goes to the coordinator's stderr

    def _started(self, run_id: str, process: subprocess.Popen) -> None:
        maddrs = self._maddrs[run_id] = Future()
        threading.Thread(target=self._read_maddrs, args=(run_id, process, maddrs), name=f"bootstrap-{run_id}",
                         daemon=True).start()

    @staticmethod
    def _read_maddrs(run_id: str, process: subprocess.Popen, maddrs: Future) -> None:
        line = process.stdout.readline()  # "" if the process ended first
        try:
            addresses = json.loads(line)
        except ValueError:
            maddrs.set_exception(Unavailable(f"the swarm peer of run '{run_id}' exited before it listened "
                                             f"(exit code {process.wait()}); try again"))
            return
        logger.info("run %s: swarm bootstrap peer (pid %d) on %s", run_id, process.pid, ", ".join(addresses))
        maddrs.set_result(addresses)

    def initial_peers(self, spec: pb.RunSpec, *, timeout: float = 0.0) -> list[str]:
        """Multiaddrs of the run's bootstrap peer, starting it if need be (any thread).

        :param timeout: seconds to wait for a starting peer; then it is Unavailable (a node's client retries), so a
          request never holds up the coordinator's worker thread for a peer's start-up
        """
        self.start(spec)
        process, maddrs = self.processes.process(spec.run_id), self._maddrs.get(spec.run_id)
        if maddrs is not None and maddrs.done() and maddrs.exception() is not None:
            raise maddrs.exception()
        if process is None or maddrs is None or process.poll() is not None:  # it died: the supervisor restarts it
            raise Unavailable(f"the swarm peer of run '{spec.run_id}' is restarting; try again shortly")
        try:
            return list(maddrs.result(timeout=timeout))
        except FutureTimeout:
            raise Unavailable(f"the swarm peer of run '{spec.run_id}' is starting; try again shortly") from None

    def shutdown(self) -> None:
        self.processes.shutdown()


def main(argv: list[str] | None = None) -> None:
    """One run's bootstrap peer: start the DHT, print its multiaddrs as a JSON line, serve until told to stop."""
    parser = argparse.ArgumentParser(description="The coordinator's swarm bootstrap peer of one run (started by "
                                                 "omi-coordinator serve).")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--spec", required=True, help="the run's RunSpec, serialized, in hex")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--db", default=None, help="SQLAlchemy URL (default: SQLite under the state dir)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    # stdout carries the addresses to the coordinator and nothing else: what this process and the ones it starts
    # print goes to stderr, the coordinator's log
    addresses = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from omi.coordinator.credentials import KEY_FILENAME
    from omi.swarm import publish_revocations
    from omi.swarm.dht import start_bootstrap_dht
    from omi.swarm.signals import install_stop_signals

    spec = pb.RunSpec.FromString(bytes.fromhex(args.spec))
    folder = args.state_dir / "swarm" / spec.run_id
    folder.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    install_stop_signals(stop.set)
    key = signing.load_key(args.state_dir / KEY_FILENAME)
    dht, maddrs = start_bootstrap_dht(key, spec, host=args.host, identity_path=str(folder / "p2p.id"),
                                      swarm_key_path=str(folder / "swarm_rsa.pem"), token_ttl=spec.liveness.token_ttl)
    revocations = Revocations(Store(args.db or sqlite_url(args.state_dir)), spec,
                              lambda peers, lifetime: publish_revocations(dht, key, spec, peers, lifetime))
    try:
        print(json.dumps(maddrs), file=addresses, flush=True)
        while not stop.wait(1.0):
            revocations.maybe_publish()
    finally:
        dht.shutdown()


class Revocations:
    """Publishes the coordinator's revocation of every peer id of a banned node in the run's swarm."""

    def __init__(self, store: Store, spec: pb.RunSpec, publish: Callable[[list[str], float], int]):
        self.store, self.spec, self.publish = store, spec, publish
        self.published: dict[str, float] = {}  # peer id -> when (monotonic)
        self._last_poll = -float("inf")

    def banned_peer_ids(self) -> set[str]:
        """Peer ids bound to banned nodes, and those their tokens of this run named."""
        with self.store.session() as s:
            bound = s.scalars(select(PeerBinding.peer_id).join(Ban, Ban.node_id == PeerBinding.node_id))
            named = s.scalars(select(Token.peer_id).join(Ban, Ban.node_id == Token.node_id)
                              .where(Token.run_id == self.spec.run_id))
            return set(bound) | set(named)

    def maybe_publish(self) -> None:
        """Every :data:`REVOCATION_POLL` seconds: publish new revocations, and re-publish old ones now and then."""
        now = time.monotonic()
        if now - self._last_poll < REVOCATION_POLL:
            return
        self._last_poll = now
        try:
            due = sorted(peer for peer in self.banned_peer_ids()
                         if now - self.published.get(peer, -float("inf")) > REVOCATION_REFRESH)
            if due:
                stored = self.publish(due, self.spec.liveness.token_ttl + 60)
                self.published.update({peer: now for peer in due})
                logger.info("run %s: revoked %d banned peer(s) in the swarm (%d stored)", self.spec.run_id,
                            len(due), stored)
        except Exception as e:  # a database or DHT hiccup: the next poll tries again
            logger.warning("could not publish the swarm revocations: %r", e)
