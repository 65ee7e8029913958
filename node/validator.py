"""`omi-node validate`: follow the swarm's θ_r, replay audited segments of rounds, report signed verdicts.

    omi-node validate --coordinator 127.0.0.1:50051
    omi-node validate --coordinator coord.example.org:50051 --state-dir ~/.omi/validator

A validator is a token-holding swarm peer that never trains. It keeps θ_r of the last W rounds
(``verification.audit_window_rounds`` + 1, :class:`~omi.node.parameter_history.ParameterHistory`), downloaded from
peers as the swarm's round moves on (:class:`omi.swarm.SwarmFollower`), keyed by :func:`omi.models.params_hash`. It
takes ``AuditTask``s — each one segment of ``verification.segment_steps`` inner steps of a contribution's round —
has :class:`~omi.node.recompute.Recomputer` replay and judge each, and reports the signed verdict.

A node that cannot be reached, or whose θ_r is not the validator's own, gets no verdict (the task goes back to the
queue). The coordinator runs one built in (``omi-coordinator serve`` starts ``omi-node validate --token-file``)
unless disabled.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from omi.node.parameter_history import ParameterHistory
from omi.node.recompute import Recomputer
from omi.node.session import NodeSession
from omi.swarm.params_p2p import ParamsFetcher

logger = logging.getLogger(__name__)

POLL_INTERVAL = 1.0  # seconds between GetAuditTask calls when there is nothing to audit
STATE_TIMEOUT_FACTOR = 2.0  # a state download may take this many averaging timeouts (as a volunteer's load)


@dataclass
class ValidatorConfig:
    """Settings of ``omi-node validate``."""

    coordinator: str  # HOST:PORT of the coordinator's gRPC API
    run_id: str = ""  # the run to validate ("": the only running one)
    state_dir: Path = field(default_factory=lambda: Path(os.environ.get("OMI_HOME", Path.home() / ".omi"))
                            / "validator")
    token_file: Path | None = None  # a coordinator-minted token (built-in validator): no registration
    host: str = "127.0.0.1"  # address the swarm peer listens on
    threads: int = 0  # torch CPU threads (0: torch's default); equal to the nodes' for bitwise recomputation
    max_tasks: int = 0  # stop after this many verdicts (0: until Ctrl-C)


class Validator:
    """A validator peer: registers (or uses a minted token), follows the swarm's θ_r, audits until stopped.

    :param config: its settings

    >>> validator = Validator(ValidatorConfig(coordinator="127.0.0.1:50051"))  # doctest: +SKIP
    >>> try:  # doctest: +SKIP
    ...     validator.run()
    ... finally:
    ...     validator.shutdown()
    """

    def __init__(self, config: ValidatorConfig):
        self.config = config
        self.session = NodeSession(config.coordinator, config.state_dir, token_file=config.token_file)
        self.dht = self.follower = self.fetcher = None
        self.verdicts = 0
        self._stop = threading.Event()

    def run(self) -> int:
        """Audit until stopped (or ``max_tasks`` verdicts); returns the number of verdicts reported."""
        from omi.swarm import SwarmFollower, start_dht

        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        spec = self.session.open(self.config.run_id, display_name="validator")
        self.client = self.session.client
        self.recomputer = Recomputer.for_spec(spec)
        self.history = ParameterHistory(spec.verification.audit_window_rounds + 1)
        self.dht = start_dht(spec, self.session.tokens, swarm_key=self.session.swarm_key,
                             identity_path=self.config.state_dir / "p2p.id", host=self.config.host)
        self.follower = SwarmFollower(self.dht, spec, self.recomputer.model)
        self.fetcher = ParamsFetcher(self.dht, spec)
        logger.info("validating run %s as node %s", spec.run_id, self.session.node_id[:12])
        held = -1
        while not self._stop.is_set():
            if self.config.max_tasks and self.verdicts >= self.config.max_tasks:
                break
            swarm_round = self.follower.swarm_round()
            if swarm_round > held:
                round_number = self.follower.pull(timeout=STATE_TIMEOUT_FACTOR * spec.averaging.averaging_timeout)
                held = max(held, round_number)
                digest = self.history.add(round_number, self.recomputer.model)
                logger.info("holding θ of round %d (%s)", round_number, digest.hex()[:12])
            if not self.session.renew_token_if_needed():
                break
            if not self._audit_one():
                self._stop.wait(POLL_INTERVAL)
        return self.verdicts

    def _audit_one(self) -> bool:
        """Take one task and report its verdict; False when there was nothing to do."""
        try:
            task = self.client.get_audit_task()
        except grpc.RpcError as e:
            logger.warning("GetAuditTask failed: %s %s", e.code().name, e.details())
            return False
        if not task.has_task:
            return False
        verdict = self.recomputer.check_segment(task, self.history, self.fetcher)
        if verdict is None:
            return False  # the task goes to another validator once it times out
        try:
            self.client.report_audit_verdict(verdict)
        except grpc.RpcError as e:
            logger.warning("verdict refused: %s %s", e.code().name, e.details())
            return False
        self.verdicts += 1
        logger.info("audit %s of node %s round %d: %s%s", task.task_id[:8], task.node_id[:12], task.round,
                    "passed" if verdict.passed else "FAILED", "" if verdict.passed else f" ({verdict.reason})")
        return True

    def stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        self._stop.set()
        if self.fetcher is not None:
            self.fetcher.shutdown()
            self.fetcher = None
        if self.follower is not None:
            self.follower.shutdown()
            self.follower = None
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None
        self.session.close()
