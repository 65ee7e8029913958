"""The node's gRPC client of the coordinator: registration, signed requests, and retries while it is unreachable.

>>> from omi.node.identity import NodeIdentity
>>> client = CoordinatorClient("127.0.0.1:50051", NodeIdentity.load_or_create().key)  # doctest: +SKIP
>>> client.register("digits", Path("p2p.id").read_bytes(), display_name="alice")      # doctest: +SKIP
>>> work = client.get_work(round_number=0)                                                   # doctest: +SKIP
"""

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from omi.protos import pb, peer_ids, rpc, signing
from omi.protos.channels import open_channel
from omi.protos.clock import now_ms

logger = logging.getLogger(__name__)

T = TypeVar("T")


def with_retries(call: Callable[[], T], *, attempts: int = 5, backoff: float = 1.0, max_backoff: float = 30.0) -> T:
    """Run ``call``; while the coordinator is UNAVAILABLE, retry up to ``attempts`` times in all, waiting
    ``backoff`` seconds and doubling (at most ``max_backoff``). Other errors are raised at once."""
    assert attempts >= 1, "attempts must be >= 1"
    delay = backoff
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts:
                raise
            logger.warning("coordinator unavailable (%s), retrying in %gs (attempt %d of %d)",
                           e.details() or "unreachable", delay, attempt, attempts)
            time.sleep(delay)
            delay = min(delay * 2, max_backoff)
    raise AssertionError("unreachable")


def register_request(key: Ed25519PrivateKey, challenge_nonce: bytes, run_id: str, peer_identity: bytes,
                     **fields) -> pb.RegisterRequest:
    """A signed RegisterRequest answering ``challenge_nonce``: the node's Ed25519 key signs it all, the libp2p
    identity (its file's bytes) proves the peer id it names. ``fields``: display_name, swarm_public_key."""
    peer_public_key, peer_signature = peer_ids.sign_binding(peer_identity, challenge_nonce, signing.public_bytes(key),
                                                            run_id)
    request = pb.RegisterRequest(public_key=signing.public_bytes(key), nonce=challenge_nonce, run_id=run_id,
                                 peer_id=peer_ids.peer_id_of(peer_public_key), peer_public_key=peer_public_key,
                                 peer_signature=peer_signature, **fields)
    return signing.sign(request, key)


class CoordinatorClient:
    """Both services of the coordinator for one node identity; keeps the node's token once registered.

    :param address: the coordinator's gRPC API, ``HOST:PORT`` or ``HOST:PORT#sha256:FINGERPRINT`` (TLS: the
      certificate pinned, or trusted on first use: :mod:`omi.protos.channels`)
    :param identity_key: the node's Ed25519 key (``omi.node.identity.NodeIdentity.key``)
    :param timeout: deadline of each call, in seconds
    :param attempts: tries per call while the coordinator is UNAVAILABLE (1 = no retry)
    :param backoff: first wait between tries, in seconds (doubles each time)
    :param known: the known-coordinators file of trust on first use (default ``$OMI_HOME/known_coordinators.json``)
    """

    def __init__(self, address: str, identity_key: Ed25519PrivateKey, *, timeout: float = 10.0, attempts: int = 5,
                 backoff: float = 1.0, known: Path | None = None):
        self.address, self.known = address, known
        self.key = identity_key
        self.public_key = signing.public_bytes(identity_key)
        self.node_id = signing.node_id(self.public_key)
        self.timeout, self.attempts, self.backoff = timeout, attempts, backoff
        self.channel: grpc.Channel | None = None
        self._stub: rpc.CoordinatorStub | None = None
        self.token: pb.AccessToken | None = None
        self.run_spec: pb.RunSpec | None = None

    @property
    def stub(self) -> rpc.CoordinatorStub:
        """The stub over a TLS channel opened on first use: while the coordinator is unreachable this raises an
        UNAVAILABLE RpcError (callers retry); a certificate that is not the pinned or known one raises
        :class:`~omi.protos.channels.CertificateRefused`."""
        if self._stub is None:
            self.channel = open_channel(self.address, known=self.known)
            self._stub = rpc.CoordinatorStub(self.channel)
        return self._stub

    def _call(self, method: str, make_request: Callable[[], object]):
        """Call ``method`` with a request built (and signed) afresh on every try."""
        return with_retries(lambda: getattr(self.stub, method)(make_request(), timeout=self.timeout),
                            attempts=self.attempts, backoff=self.backoff)

    def _signed(self, request_class, **fields):
        """A node request carrying the token, a fresh timestamp and nonce, signed by the node for its RPC."""
        assert self.token is not None, "register first"
        return signing.sign_request(request_class(token=self.token, timestamp_ms=now_ms(), **fields), self.key)

    # ---------------------------------------------------------------- identity and access

    def register(self, run_id: str, peer_identity: bytes, display_name: str = "",
                 swarm_public_key: bytes = b"") -> pb.RegisterResponse:
        """Answer a fresh challenge and register for ``run_id``; keeps the token and RunSpec.

        :param peer_identity: the bytes of the node's libp2p identity file (hivemind's ``identity_path``): the
          request names its peer id and proves it holds the key (:func:`omi.protos.peer_ids.sign_binding`)
        """
        def attempt() -> pb.RegisterResponse:
            challenge = self.stub.GetChallenge(pb.GetChallengeRequest(), timeout=self.timeout)
            request = register_request(self.key, challenge.nonce, run_id, peer_identity, display_name=display_name,
                                       swarm_public_key=swarm_public_key)
            return self.stub.Register(request, timeout=self.timeout)

        response = with_retries(attempt, attempts=self.attempts, backoff=self.backoff)
        self.token, self.run_spec = response.token, response.run_spec
        return response

    def renew_token(self) -> pb.AccessToken:
        self.token = self._call("RenewToken", lambda: self._signed(pb.RenewTokenRequest))
        return self.token

    def heartbeat(self, round_number: int = 0, samples_per_second: float = 0.0, swarm_peers: int = 0,
                  loss: float = 0.0) -> pb.HeartbeatResponse:
        return self._call("Heartbeat", lambda: self._signed(
            pb.HeartbeatRequest, round=round_number, samples_per_second=samples_per_second, swarm_peers=swarm_peers,
            loss=loss))

    def get_run_spec(self, run_id: str | None = None) -> pb.RunSpec:
        return self._call("GetRunSpec", lambda: pb.GetRunSpecRequest(run_id=run_id or self.token.run_id))

    def get_work(self, round_number: int) -> pb.WorkAssignment:
        return self._call("GetWork", lambda: self._signed(pb.GetWorkRequest, round=round_number))

    def report_contribution(self, contribution: pb.Contribution) -> pb.ReportContributionResponse:
        """Fill in run, node and time if unset, sign the Contribution, and report it."""
        assert self.token is not None, "register first"
        contribution.run_id = contribution.run_id or self.token.run_id
        contribution.node_id = contribution.node_id or self.node_id
        contribution.created_at_ms = contribution.created_at_ms or now_ms()
        signing.sign(contribution, self.key)
        return self._call("ReportContribution",
                          lambda: self._signed(pb.ReportContributionRequest, contribution=contribution))

    def leave(self) -> None:
        """Tell the coordinator this node is going (its unfinished shards go back to the pool)."""
        self._call("Leave", lambda: self._signed(pb.LeaveRequest))

    def get_audit_task(self) -> pb.AuditTask:
        return self._call("GetAuditTask", lambda: self._signed(pb.GetAuditTaskRequest))

    def report_audit_verdict(self, verdict: pb.AuditVerdict) -> pb.ReportAuditVerdictResponse:
        """Fill in the validator id and time if unset, sign the verdict, and report it."""
        verdict.validator_node_id = verdict.validator_node_id or self.node_id
        verdict.created_at_ms = verdict.created_at_ms or now_ms()
        signing.sign(verdict, self.key)
        return self._call("ReportAuditVerdict", lambda: self._signed(pb.ReportAuditVerdictRequest, verdict=verdict))

    def submit_audit_records(self, task_id: str, records: list[pb.MicroBatchRecord]) -> pb.SubmitAuditRecordsResponse:
        """Hand over every record of an audited round (the coordinator checks them against the commitment)."""
        return self._call("SubmitAuditRecords", lambda: self._signed(pb.SubmitAuditRecordsRequest, task_id=task_id,
                                                                     records=records))

    # ---------------------------------------------------------------- public views

    def list_runs(self) -> list[pb.RunSummary]:
        return list(self._call("ListRuns", pb.ListRunsRequest).runs)

    def get_run_status(self, run_id: str | None = None) -> pb.RunStatus:
        return self._call("GetRunStatus", lambda: pb.GetRunStatusRequest(run_id=run_id or self.token.run_id))

    def list_checkpoints(self, run_id: str | None = None) -> list[pb.Checkpoint]:
        request = lambda: pb.ListCheckpointsRequest(run_id=run_id or self.token.run_id)  # noqa: E731
        return list(self._call("ListCheckpoints", request).checkpoints)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()

    def __enter__(self) -> "CoordinatorClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
