"""A node's standing with the coordinator: identity, registration, token renewal, heartbeats, leaving.

Both roles a node can take use it — the volunteer (:mod:`omi.node.volunteer`) and the validator
(:mod:`omi.node.validator`)::

    session = NodeSession("127.0.0.1:50051", Path("~/.omi").expanduser())
    spec = session.open(display_name="alice")   # registers; the token is written to state_dir/token.bin
    session.renew_token_if_needed()             # one rule: renew when half of the token's lifetime is left
    session.leave(); session.close()

The swarm peer of the node reads its token from the same file (:class:`omi.protos.tokens.TokenFile`): hivemind
runs the DHT in a forked process, which sees renewals only through the file.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from omi.node.client import CoordinatorClient
from omi.node.identity import NodeIdentity
from omi.protos import pb
from omi.protos.channels import KNOWN_FILENAME, CertificateRefused
from omi.protos.refusals import refusal_of
from omi.protos.tokens import TokenFile
from omi.swarm.keys import load_or_create_peer_identity, load_or_create_swarm_key, swarm_public_key

logger = logging.getLogger(__name__)

TOKEN_RENEW_FRACTION = 0.5  # renew the access token when this fraction of its lifetime is left
REFUSED_CODES = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


class NodeError(RuntimeError):
    """A problem the volunteer can fix (wrong address, unknown run, unwritable folder); exit_code says which."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def check_state_dir(path: Path) -> None:
    """Refuse a state dir that cannot be created or written, before anything else touches it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise NodeError(f"state dir {path} is not writable: {e.strerror or e}", exit_code=2) from e


class NodeSession:
    """One node identity's session with the coordinator of a run.

    :param coordinator: HOST:PORT of the coordinator's gRPC API
    :param state_dir: the node's identity, swarm keys and token live here
    :param identity: Ed25519 key file (default: ``state_dir/node_key.pem``)
    :param token_file: a token the coordinator minted for this node (its built-in validator): no registration,
        and renewals are read from the file, which the coordinator rewrites
    :param connect_attempts: tries per call while the coordinator is unreachable (backoff doubles from 1 s)

    >>> session = NodeSession("127.0.0.1:50051", Path("/tmp/omi-node"))  # doctest: +SKIP
    >>> spec = session.open(run_id="digits", display_name="alice")          # doctest: +SKIP
    """

    def __init__(self, coordinator: str, state_dir: Path, *, identity: Path | None = None,
                 token_file: Path | None = None, connect_attempts: int = 5):
        self.coordinator, self.state_dir = coordinator, Path(state_dir)
        self.identity_path = identity or self.state_dir / "node_key.pem"
        self.minted = token_file is not None
        self.tokens = TokenFile(token_file or self.state_dir / "token.bin")
        self.connect_attempts = connect_attempts
        self.client: CoordinatorClient | None = None
        self.node_id = self.peer_id = ""
        self.swarm_key = None
        self.registered = False
        self.refused: str | None = None  # why the coordinator refused this node, if it did

    def open(self, run_id: str = "", display_name: str = "") -> pb.RunSpec:
        """Load or create the keys, then register with the coordinator (or read the minted token); returns the
        run's spec. ``run_id`` "" joins the coordinator's only running run."""
        check_state_dir(self.state_dir)
        identity = NodeIdentity.load_or_create(self.identity_path)
        self.node_id = identity.node_id
        self.client = CoordinatorClient(self.coordinator, identity.key, attempts=self.connect_attempts,
                                        known=self.state_dir / KNOWN_FILENAME)
        self.peer_id = load_or_create_peer_identity(self.state_dir / "p2p.id")
        self.swarm_key = load_or_create_swarm_key(self.state_dir / "swarm_rsa.pem")
        try:
            if self.minted:
                self.client.token = self.tokens()
                return self.client.get_run_spec(self.client.token.run_id)
            run_id = run_id or self._only_running_run()
            response = self.client.register(run_id, (self.state_dir / "p2p.id").read_bytes(), display_name,
                                            swarm_public_key(self.swarm_key))
        except grpc.RpcError as e:
            raise self.error(e) from e
        except CertificateRefused as e:
            raise NodeError(str(e), 5) from e
        self.registered = True
        self.tokens.write(response.token)
        logger.info("registered as node %s in run %s (peer %s)", self.node_id[:12], run_id, self.peer_id)
        return response.run_spec

    def _only_running_run(self) -> str:
        runs = [run for run in self.client.list_runs() if run.state == pb.RUN_STATE_RUNNING]
        if len(runs) != 1:
            names = ", ".join(run.run_id for run in runs) or "none"
            raise NodeError(f"pass --run: the coordinator has {len(runs)} running runs ({names})", 4)
        return runs[0].run_id

    def error(self, e: grpc.RpcError) -> NodeError:
        """The coordinator's refusal as a :class:`NodeError` with the exit code ``omi-node`` documents."""
        code = e.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return NodeError(f"cannot reach the coordinator at {self.coordinator}: {e.details()}", 3)
        if refusal_of(e) == pb.REFUSAL_UNKNOWN_RUN:
            return NodeError(f"the coordinator refused: {e.details()}", 4)
        if code in REFUSED_CODES:
            self.refused = e.details() or code.name
            return NodeError(f"the coordinator refused this node: {e.details()}", 5)
        return NodeError(f"the coordinator answered {code.name}: {e.details()}", 1)

    def renew_token_if_needed(self) -> bool:
        """Renew the access token once less than :data:`TOKEN_RENEW_FRACTION` of its lifetime is left.

        :returns: False if the coordinator refused to renew it (the node is banned; ``refused`` says why)
        :raises grpc.RpcError: for other failures (the next call tries again)
        """
        if self.minted:
            self.client.token = self.tokens()
            return True
        token = self.client.token
        left = token.expires_at_ms / 1000 - time.time()
        if left >= TOKEN_RENEW_FRACTION * (token.expires_at_ms - token.issued_at_ms) / 1000:
            return True
        try:
            self.tokens.write(self.client.renew_token())
        except grpc.RpcError as e:
            if e.code() in REFUSED_CODES:
                # banned: the swarm refuses this node once its token expires, so there is no point going on
                logger.error("the coordinator refused to renew this node's access token: %s", e.details())
                self.refused = e.details() or e.code().name
                return False
            raise
        logger.info("access token renewed until %s",
                    time.strftime("%H:%M:%S", time.localtime(self.client.token.expires_at_ms / 1000)))
        return True

    def start_heartbeats(self, interval: float, stop: threading.Event, beat: Callable[[], dict],
                         on_refused: Callable[[], None]) -> threading.Thread:
        """Renew the token and send a heartbeat every ``interval`` seconds until ``stop`` is set.

        :param beat: the heartbeat's fields now (round, samples_per_second, swarm_peers, loss)
        :param on_refused: called once when the coordinator refuses to renew the token
        """

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    if not self.renew_token_if_needed():
                        on_refused()
                        return
                    fields = beat()
                    loss = fields.get("loss", 0.0)
                    fields["loss"] = loss if math.isfinite(loss) else 0.0  # 0: unknown (a diverged model)
                    self.client.heartbeat(**fields)
                except grpc.RpcError as e:
                    logger.warning("heartbeat failed: %s %s", e.code().name, e.details())

        thread = threading.Thread(target=loop, daemon=True, name="omi-heartbeat")
        thread.start()
        return thread

    def leave(self, run_id: str = "") -> None:
        """Tell the coordinator this node leaves (its open assignments go back to the pool)."""
        if self.client is None or not self.registered:
            return
        try:
            self.client.leave()
            logger.info("left run %s", run_id)
        except grpc.RpcError as e:
            logger.warning("could not tell the coordinator we left: %s", e.details())

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
