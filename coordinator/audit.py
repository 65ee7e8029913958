"""The auditor: samples contributions, hands audit tasks to validators and applies their verdicts.

A contribution is audited with probability ``verification.audit_rate``; the micro-batches to
recompute and the audit seed are drawn with ``secrets`` after the node committed to its records,
so a node cannot know in advance which micro-batches will be checked. A failed verdict voids the
contribution and adds a strike; ``verification.max_strikes`` strikes ban the node.
"""

import json
import logging
import secrets
import uuid

from omi.coordinator.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from omi.coordinator.registry import Caller, Registry
from omi.coordinator.runs import Runs, now_ms
from omi.coordinator.store import Audit, Contribution, Node, Store, WorkAssignment
from omi.protos import pb, signing
from sqlalchemy import or_, select

logger = logging.getLogger(__name__)


class Auditor:
    """Audit sampling and verdicts.

    :param store: the database
    :param runs: run specs (audit rate, micro-batches per audit, max strikes)
    :param registry: bans nodes that reach max strikes
    :param task_timeout: seconds a validator has for a task before it is handed to another
    """

    def __init__(self, store: Store, runs: Runs, registry: Registry, *, task_timeout: float = 600.0):
        self.store, self.runs, self.registry = store, runs, registry
        self.task_timeout = task_timeout

    def maybe_queue(self, session, contribution: Contribution, micro_batches: int) -> Audit | None:
        """Inside the ledger's transaction: draw whether to audit ``contribution``; queue a task if so."""
        spec = self.runs.get(contribution.run_id).spec.verification
        if secrets.randbelow(1_000_000) >= int(spec.audit_rate * 1_000_000):
            return None
        count = min(spec.micro_batches_per_audit, micro_batches)
        indices = sorted(secrets.SystemRandom().sample(range(micro_batches), count))
        audit = Audit(task_id=uuid.uuid4().hex, contribution_id=contribution.contribution_id,
                      run_id=contribution.run_id, node_id=contribution.node_id, epoch=contribution.epoch,
                      micro_batch_indices=json.dumps(indices), audit_seed=secrets.randbits(63), state="pending",
                      created_at_ms=now_ms())
        session.add(audit)
        return audit

    def next_task(self, validator: Caller) -> pb.AuditTask:
        """An audit of someone else's work in the validator's run (the one it already holds, if any)."""
        now = now_ms()
        stale = now - int(self.task_timeout * 1000)
        with self.store.transaction() as s:
            audit = s.scalars(select(Audit).where(
                Audit.run_id == validator.run_id, Audit.node_id != validator.node_id,
                or_(Audit.state == "pending",
                    (Audit.state == "assigned") & ((Audit.validator_node_id == validator.node_id)
                                                   | (Audit.assigned_at_ms < stale))))
                .order_by((Audit.validator_node_id == validator.node_id).desc(), Audit.created_at_ms).limit(1)).first()
            if audit is None:
                return pb.AuditTask(has_task=False)
            audit.state, audit.validator_node_id, audit.assigned_at_ms = "assigned", validator.node_id, now
            contribution = pb.Contribution.FromString(s.get(Contribution, audit.contribution_id).message)
            assignment = pb.WorkAssignment.FromString(s.get(WorkAssignment, contribution.assignment_id).message)
            return pb.AuditTask(task_id=audit.task_id, run_id=audit.run_id, contribution_id=audit.contribution_id,
                                node_id=audit.node_id, epoch=audit.epoch, params_hash=contribution.params_hash,
                                assignment=assignment, micro_batch_indices=json.loads(audit.micro_batch_indices),
                                audit_seed=audit.audit_seed, has_task=True)

    def record_verdict(self, validator: Caller, verdict: pb.AuditVerdict) -> None:
        """Store a validator-signed verdict on a task it holds; a failure voids the work and strikes the node."""
        if verdict.validator_node_id != validator.node_id:
            raise PermissionDenied("verdict names another validator than the token")
        if not signing.verify(verdict, validator.public_key):
            raise InvalidArgument("bad signature on AuditVerdict")
        banned = None
        with self.store.transaction() as s:
            audit = s.get(Audit, verdict.task_id)
            if audit is None:
                raise NotFound(f"no audit task {verdict.task_id!r}")
            if audit.state in ("passed", "failed"):
                raise AlreadyExists(f"audit task {verdict.task_id} already has a verdict")
            if audit.validator_node_id != validator.node_id:
                raise FailedPrecondition(f"audit task {verdict.task_id} is not assigned to this validator")
            audit.state = "passed" if verdict.passed else "failed"
            audit.verdict = verdict.SerializeToString(deterministic=True)
            audit.decided_at_ms = now_ms()
            contribution = s.get(Contribution, audit.contribution_id)
            if verdict.passed:
                contribution.status = "verified"
            else:
                banned = self._strike(s, audit, contribution, verdict.reason)
        if banned:
            self.registry.banned_committed(banned)
        if not verdict.passed:
            self.runs.samples_committed(audit.run_id, -contribution.samples)
        logger.info("audit %s of node %s epoch %d: %s", audit.task_id[:8], audit.node_id[:12], audit.epoch,
                    audit.state)

    def _strike(self, session, audit: Audit, contribution: Contribution, reason: str) -> str | None:
        """Void the contribution and strike its node; returns the node id if this strike bans it."""
        contribution.status = "voided"
        self.runs.add_samples(session, audit.run_id, -contribution.samples)
        node = session.get(Node, audit.node_id)
        node.strikes += 1
        max_strikes = self.runs.get(audit.run_id).spec.verification.max_strikes
        logger.warning("node %s failed an audit (%s): strike %d of %d", node.node_id[:12], reason or "no reason",
                       node.strikes, max_strikes)
        if node.strikes >= max_strikes and self.registry.ban_in(session, node.node_id, f"{node.strikes} failed audits"):
            return node.node_id
        return None
