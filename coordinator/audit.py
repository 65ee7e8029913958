"""The auditor: samples contributions, checks the handed-over records, queues recomputations, applies verdicts.

An audit goes through these states (``Audit.state``):

1. ``awaiting_records`` — when a contribution arrives (its Merkle ``commitment`` is in it), the auditor draws
   with ``secrets`` whether to audit it (``verification.audit_rate``; every contribution of a node that already
   has a strike), which segment of the round (``verification.segment_steps`` inner steps between two committed
   training states) a validator will replay, and the audit seed. The node is told only *that* it is audited
   (``ReportContributionResponse.audit_task_id``) and hands over all records of the round (``SubmitAuditRecords``);
   it never learns which segment gets replayed.
2. The coordinator checks the records without recomputing anything (:mod:`omi.coordinator.records_check`): their
   Merkle root is the commitment, their count is ``micro_batches``, their samples add up to ``samples``, their
   losses to ``mean_loss``, and their sketches' sample-weighted combination is the ``gradient_sketch`` the node
   said it sent into the averaging. Any mismatch fails the audit at once; otherwise the chosen records (with Merkle
   proofs) are kept and the audit becomes ``pending``.
3. ``pending`` → ``assigned`` → ``passed``/``failed``: a validator replays the chosen segment from the start state
   the node serves (``omi.node.recompute``) and returns a signed verdict. Only nodes an admin granted the role take
   tasks. The coordinator's own (built-in) validators are trusted: their verdict decides. A volunteer validator's
   verdict is an *opinion* (``audit_opinions``): a failing one always, and a passing one with probability
   :data:`CROSS_CHECK_RATE`, goes back to ``pending`` for a second validator; two that agree decide; two that
   disagree make the audit ``disputed``, which only the coordinator's own validator takes. A validator whose opinion
   the trusted verdict overturns loses the role, and every audit its opinion decided is reopened for the
   coordinator's validator (its verified work provisional again, its failures' strikes lifted meanwhile).

A failed audit voids the contribution and adds a strike; ``verification.max_strikes`` strikes ban the node
(:mod:`omi.coordinator.strikes`). Records not handed over before the audit window closes (and at least
``records_grace`` seconds after the report) count as a failed audit.
"""

import json
import logging
import secrets
import uuid

from omi.coordinator.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from omi.coordinator.records_check import audited_records, check_records
from omi.coordinator.registry import Caller, Registry
from omi.coordinator.runs import Runs
from omi.coordinator.states import OPEN_AUDIT_STATES, AuditState, ContributionStatus
from omi.coordinator.store import (
    Audit,
    AuditOpinion,
    AuditRecords,
    Contribution,
    Node,
    Store,
    Token,
    ValidatorGrant,
    WorkAssignment,
    has_verified_contribution,
)
from omi.coordinator.strikes import Strikes
from omi.models import record_from_proto
from omi.models.segments import segment_steps
from omi.protos import pb, signing
from omi.protos.clock import now_ms
from sqlalchemy import func, or_, select, update

logger = logging.getLogger(__name__)

COORDINATOR = "coordinator"  # validator_node_id of verdicts the coordinator reaches itself (records check)
STRUCK_AUDIT_RATE = 1.0  # a node with a strike is audited on every contribution until banned
PROBATION_AUDIT_FACTOR = 2.0  # a node without verified work in the run is audited at twice the run's rate
CROSS_CHECK_RATE = 0.25  # share of a volunteer validator's passing verdicts a second validator checks (failing: all)
TASK_CANDIDATES = 50  # open audits a validator's request looks through for one it may take
MAX_VERDICT_CHECKS = 4096  # inner-step checks in one verdict: far above any segment's segment_steps


class Auditor:
    """Audit sampling, the records check, validator tasks and verdicts.

    :param store: the database
    :param runs: run specs (audit rate, micro-batches per audit, max strikes, audit window, sketch size)
    :param registry: bans nodes that reach max strikes
    :param task_timeout: seconds a validator has for a task before it is handed to another
    :param records_grace: seconds a node has from its report to hand its records over, even when the audit window
        of its round closes sooner (the swarm's round can move past the window while the report is on its way)
    """

    def __init__(self, store: Store, runs: Runs, registry: Registry, *, task_timeout: float = 600.0,
                 records_grace: float = 60.0):
        self.store, self.runs, self.registry = store, runs, registry
        self.strikes = Strikes(runs, registry)
        self.task_timeout, self.records_grace = task_timeout, records_grace
        self._trusted: set[str] = set()  # this process's own (built-in) validators: their verdict decides

    def trust(self, node_id: str) -> None:
        """``node_id`` is one of the coordinator's own validators (it must hold the role too): its verdicts decide,
        and it alone takes disputed audits."""
        self._trusted.add(node_id)

    def maybe_queue(self, session, contribution: Contribution, micro_batches: int) -> Audit | None:
        """Inside the ledger's transaction: draw whether to audit ``contribution``; if so, ask for its records.

        An audit replays one random segment of the round (``verification.segment_steps`` inner steps between two
        committed training states) from its start state (:mod:`omi.models.segments`).
        """
        run_spec = self.runs.get(contribution.run_id).spec
        spec = run_spec.verification
        node = session.get(Node, contribution.node_id)
        rate = spec.audit_rate
        if node is not None and node.strikes > 0:
            rate = STRUCK_AUDIT_RATE
        elif not has_verified_contribution(session, contribution.run_id, contribution.node_id):
            rate = min(1.0, PROBATION_AUDIT_FACTOR * rate)  # new identities earn trust with verified work
        if secrets.randbelow(1_000_000) >= int(rate * 1_000_000):
            return None
        k = segment_steps(run_spec)
        segment = secrets.randbelow(-(-micro_batches // k))
        indices = list(range(segment * k, min((segment + 1) * k, micro_batches)))
        audit = Audit(task_id=uuid.uuid4().hex, contribution_id=contribution.contribution_id,
                      run_id=contribution.run_id, node_id=contribution.node_id, round=contribution.round,
                      micro_batch_indices=json.dumps(indices), audit_seed=secrets.randbits(63),
                      state=AuditState.AWAITING_RECORDS, created_at_ms=now_ms())
        session.add(audit)
        return audit

    # ---------------------------------------------------------------- the audited node

    def submit_records(self, caller: Caller, request: pb.SubmitAuditRecordsRequest) -> pb.SubmitAuditRecordsResponse:
        """The audited node's records of the round: checked against its contribution; a mismatch fails the audit.

        The cheap checks (the task, its owner, its state, the number of records) come before any record is turned
        into tensors, so a request of many records costs the coordinator's worker no more than a lookup."""
        failure = None
        with self.store.transaction() as s:
            audit = s.get(Audit, request.task_id)
            if audit is None:
                raise NotFound(f"no audit task {request.task_id!r}")
            if audit.node_id != caller.node_id:
                raise PermissionDenied("this audit is of another node's work")
            if audit.state != AuditState.AWAITING_RECORDS:
                raise AlreadyExists(f"audit task {request.task_id} already has the records")
            contribution = s.get(Contribution, audit.contribution_id)
            message = pb.Contribution.FromString(contribution.message)
            sketch_size = self.runs.get(audit.run_id).spec.verification.sketch_size
            if len(request.records) != message.micro_batches:
                problem = (f"contribution claims {message.micro_batches} micro-batches, {len(request.records)} "
                           "records handed over")
            else:
                problem = check_records(message, [record_from_proto(r) for r in request.records], sketch_size)
            if problem:
                failure = self._fail(s, audit, contribution, problem)
            else:
                indices = json.loads(audit.micro_batch_indices)
                records = [record_from_proto(r) for r in request.records]
                s.add(AuditRecords(task_id=audit.task_id, records=pb.AuditTask(
                    records=audited_records(records, indices)).SerializeToString(deterministic=True)))
                audit.state = AuditState.PENDING
        self.strikes.committed(audit.run_id, failure)
        if problem:
            return pb.SubmitAuditRecordsResponse(accepted=False, reason=problem)
        return pb.SubmitAuditRecordsResponse(accepted=True)

    # ---------------------------------------------------------------- the validator role

    def grant(self, node_id: str, reason: str = "") -> bool:
        """Let ``node_id`` take audit tasks and report verdicts; False if it already could."""
        if len(node_id) != 64:
            raise InvalidArgument("node_id must be 64 hex characters")
        with self.store.transaction() as s:
            if s.get(ValidatorGrant, node_id) is not None:
                return False
            s.add(ValidatorGrant(node_id=node_id, reason=reason[:500], granted_at_ms=now_ms()))
        logger.info("validator role granted to %s (%s)", node_id[:12], reason or "no reason given")
        return True

    def revoke(self, node_id: str) -> bool:
        """Take the role back (tasks it holds go to another validator after ``task_timeout``); False if it had none."""
        with self.store.transaction() as s:
            grant = s.get(ValidatorGrant, node_id)
            if grant is None:
                return False
            s.delete(grant)
        logger.info("validator role revoked from %s", node_id[:12])
        return True

    def validators(self) -> list[tuple[str, str, int]]:
        """(node id, reason, granted at ms) of every node holding the role."""
        with self.store.session() as s:
            return [(g.node_id, g.reason, g.granted_at_ms) for g in s.scalars(select(ValidatorGrant)
                                                                               .order_by(ValidatorGrant.granted_at_ms))]

    def _require_role(self, session, validator: Caller) -> None:
        if session.get(ValidatorGrant, validator.node_id) is None:
            raise PermissionDenied(f"node {validator.node_id[:12]} is not a validator: an admin grants the role "
                                   f"(omi-coordinator validator grant {validator.node_id})")

    def next_task(self, validator: Caller) -> pb.AuditTask:
        """An audit of someone else's work in the validator's run (the one it already holds, if any); only for a
        node holding the validator role. A second opinion never goes to the validator of the first; a disputed
        audit only to the coordinator's own validator."""
        now = now_ms()
        stale = now - int(self.task_timeout * 1000)
        trusted = validator.node_id in self._trusted
        with self.store.transaction() as s:
            self._require_role(s, validator)
            waiting = [AuditState.PENDING, AuditState.DISPUTED] if trusted else [AuditState.PENDING]
            candidates = s.scalars(select(Audit).where(
                Audit.run_id == validator.run_id, Audit.node_id != validator.node_id,
                or_(Audit.state.in_(waiting),
                    (Audit.state == AuditState.ASSIGNED) & ((Audit.validator_node_id == validator.node_id)
                                                   | (Audit.assigned_at_ms < stale))))
                .order_by((Audit.validator_node_id == validator.node_id).desc(), Audit.created_at_ms)
                .limit(TASK_CANDIDATES)).all()
            opinions: dict[str, list[str]] = {}  # task id -> validators that gave an opinion (one query for all)
            for task_id, node_id in s.execute(select(AuditOpinion.task_id, AuditOpinion.validator_node_id).where(
                    AuditOpinion.task_id.in_([a.task_id for a in candidates]))):
                opinions.setdefault(task_id, []).append(node_id)
            audit = next((a for a in candidates if self._may_take(a, opinions.get(a.task_id, []), validator.node_id,
                                                                  trusted)), None)
            if audit is None:
                return pb.AuditTask(has_task=False)
            audit.state, audit.validator_node_id, audit.assigned_at_ms = AuditState.ASSIGNED, validator.node_id, now
            contribution = pb.Contribution.FromString(s.get(Contribution, audit.contribution_id).message)
            assignment = pb.WorkAssignment.FromString(s.get(WorkAssignment, contribution.assignment_id).message)
            held = s.get(AuditRecords, audit.task_id)
            records = pb.AuditTask.FromString(held.records).records if held is not None else []
            peer_id = s.scalars(select(Token.peer_id).where(Token.node_id == audit.node_id,
                                                            Token.run_id == audit.run_id)
                                .order_by(Token.issued_at_ms.desc()).limit(1)).first()
            return pb.AuditTask(task_id=audit.task_id, run_id=audit.run_id, contribution_id=audit.contribution_id,
                                node_id=audit.node_id, round=audit.round, params_hash=contribution.params_hash,
                                assignment=assignment, micro_batch_indices=json.loads(audit.micro_batch_indices),
                                audit_seed=audit.audit_seed, has_task=True, records=records,
                                commitment=contribution.commitment, micro_batches=contribution.micro_batches,
                                peer_id=peer_id or "", segment_hashes=contribution.segment_hashes,
                                delta_sketch=contribution.delta_sketch)

    @staticmethod
    def _opinions(session, task_id: str) -> list[AuditOpinion]:
        return list(session.scalars(select(AuditOpinion).where(AuditOpinion.task_id == task_id)
                                    .order_by(AuditOpinion.at_ms)))

    @staticmethod
    def _may_take(audit: Audit, opinions: list[str], node_id: str, trusted: bool) -> bool:
        """Whether ``node_id`` may take ``audit``, given the validators that gave an opinion on it."""
        if node_id in opinions:
            return False  # a second opinion comes from someone else
        return trusted or (audit.state != AuditState.DISPUTED and len(opinions) < 2)

    def record_verdict(self, validator: Caller, verdict: pb.AuditVerdict) -> None:
        """Store a validator-signed verdict on a task it holds: the coordinator's own validator's decides; a
        volunteer validator's is an opinion that may wait for a second one (see the module docstring)."""
        if verdict.validator_node_id != validator.node_id:
            raise PermissionDenied("verdict names another validator than the token")
        if len(verdict.checks) > MAX_VERDICT_CHECKS:  # before the signature check hashes all of it
            raise InvalidArgument(f"a verdict holds at most {MAX_VERDICT_CHECKS} micro-batch checks")
        if not signing.verify(verdict, validator.public_key):
            raise InvalidArgument("bad signature on AuditVerdict")
        failures, unbanned = [], []
        with self.store.transaction() as s:
            self._require_role(s, validator)
            audit = s.get(Audit, verdict.task_id)
            if audit is None:
                raise NotFound(f"no audit task {verdict.task_id!r}")
            if audit.state in (AuditState.PASSED, AuditState.FAILED):
                raise AlreadyExists(f"audit task {verdict.task_id} already has a verdict")
            if audit.validator_node_id != validator.node_id or audit.state != AuditState.ASSIGNED:
                raise FailedPrecondition(f"audit task {verdict.task_id} is not assigned to this validator")
            signed = verdict.SerializeToString(deterministic=True)
            earlier = self._opinions(s, audit.task_id)
            s.add(AuditOpinion(task_id=audit.task_id, validator_node_id=validator.node_id, passed=verdict.passed,
                               verdict=signed, at_ms=now_ms()))
            overturned = []
            if validator.node_id in self._trusted:
                overturned = sorted({o.validator_node_id for o in earlier if o.passed != verdict.passed})
            elif not earlier and (not verdict.passed or secrets.randbelow(1_000_000) < CROSS_CHECK_RATE * 1_000_000):
                self._reopen(audit, AuditState.PENDING, "a second validator checks this verdict")
                return
            elif earlier and earlier[-1].passed != verdict.passed:
                self._reopen(audit, AuditState.DISPUTED, "two validators disagree; the coordinator's validator "
                                                         "decides")
                return
            failures.append(self._decide(s, audit, verdict.passed, verdict.reason, signed))
            for node_id in overturned:
                failures += self._overturn(s, node_id, unbanned)
        for failure in failures:
            self.strikes.committed(audit.run_id, failure)
        for node_id in unbanned:
            self.registry.unbanned_committed(node_id)
        logger.info("audit %s of node %s round %d: %s", audit.task_id[:8], audit.node_id[:12], audit.round,
                    audit.state)

    @staticmethod
    def _reopen(audit: Audit, state: AuditState, why: str) -> None:
        audit.state, audit.validator_node_id, audit.assigned_at_ms = state, None, None
        logger.info("audit %s of node %s round %d: %s (%s)", audit.task_id[:8], audit.node_id[:12], audit.round,
                    state, why)

    def _decide(self, session, audit: Audit, passed: bool, reason: str, verdict: bytes):
        """Apply a verdict: pass verifies the contribution; fail voids it and strikes the node (:meth:`_fail`)."""
        audit.verdict, audit.decided_at_ms = verdict, now_ms()
        contribution = session.get(Contribution, audit.contribution_id)
        if not passed:
            return self._fail(session, audit, contribution, reason, verdict=verdict)
        audit.state = AuditState.PASSED
        if contribution.status == ContributionStatus.ACCEPTED:
            contribution.status = ContributionStatus.VERIFIED
        return None

    def _overturn(self, session, node_id: str, unbanned: list[str]) -> list:
        """The coordinator's validator overturned ``node_id``'s opinion: take its role and reopen, for the
        coordinator's validator, every audit its opinion decided (undoing the verdict's effect meanwhile; nodes
        whose ban is lifted go into ``unbanned``)."""
        grant = session.get(ValidatorGrant, node_id)
        if grant is not None:
            session.delete(grant)
        logger.warning("validator %s was overturned by the coordinator's validator: role revoked, its verdicts "
                       "re-examined", node_id[:12])
        failures = []
        for opinion in session.scalars(select(AuditOpinion).where(AuditOpinion.validator_node_id == node_id)).all():
            audit = session.get(Audit, opinion.task_id)
            decided = {AuditState.PASSED: True, AuditState.FAILED: False}.get(audit.state)
            if decided is None or decided != opinion.passed or any(
                    o.validator_node_id in self._trusted for o in self._opinions(session, audit.task_id)):
                continue  # open, or decided against it, or decided by the coordinator's validator
            contribution = session.get(Contribution, audit.contribution_id)
            if decided and contribution.status == ContributionStatus.VERIFIED:
                contribution.status = ContributionStatus.ACCEPTED  # provisional until re-examined
            elif not decided:
                failures.append(self.strikes.lift(session, audit, contribution, unbanned))
            self._reopen(audit, AuditState.DISPUTED, f"decided by overturned validator {node_id[:12]}")
        return failures

    # ---------------------------------------------------------------- the audit window

    def close_windows(self, run_id: str) -> int:
        """Apply the audit window of ``run_id`` at its current round; returns contributions newly verified.

        Audits still waiting for records when the window closes, and ``records_grace`` after the report, fail (the
        node did not hand them over: a node is never struck for a deadline it could not meet). Contributions that
        were not audited become verified once their window closed **and** the audits drawn in it ran: only up to the
        first round with an audit still open (pending, assigned or awaiting records), and only if some audit of
        those rounds got a verdict. Audited contributions are verified by their passed verdict, at once.
        """
        info = self.runs.get(run_id)
        closed_before = info.round - info.spec.verification.audit_window_rounds  # rounds <= this are closed
        if closed_before < 0:
            return 0
        reported_before = now_ms() - int(self.records_grace * 1000)
        with self.store.session() as s:
            overdue = list(s.scalars(select(Audit.task_id).where(
                Audit.run_id == run_id, Audit.state == AuditState.AWAITING_RECORDS, Audit.round <= closed_before,
                Audit.created_at_ms <= reported_before)))
        for task_id in overdue:
            failure = None
            with self.store.transaction() as s:
                audit = s.get(Audit, task_id)
                if audit.state == AuditState.AWAITING_RECORDS:
                    contribution = s.get(Contribution, audit.contribution_id)
                    failure = self._fail(s, audit, contribution, "records not handed over within the audit window")
            self.strikes.committed(run_id, failure)
        with self.store.transaction() as s:
            # unaudited work counts as checked only where the audits drawn beside it ran: up to the first round with
            # an audit still open, and only once some audit of those rounds got a verdict (a run without validators,
            # or with audit_rate 0, verifies nothing: its credit stays provisional)
            first_open = s.scalar(select(func.min(Audit.round)).where(Audit.run_id == run_id,
                                                                       Audit.state.in_(OPEN_AUDIT_STATES)))
            upto = closed_before if first_open is None else min(closed_before, first_open - 1)
            audited = s.scalar(select(func.count()).select_from(Audit).where(
                Audit.run_id == run_id, Audit.round <= upto, Audit.state.in_((AuditState.PASSED, AuditState.FAILED))))
            if not audited:
                return 0
            result = s.execute(update(Contribution).where(
                Contribution.run_id == run_id, Contribution.status == ContributionStatus.ACCEPTED,
                Contribution.round <= upto,
            ).values(status=ContributionStatus.VERIFIED))
            return result.rowcount or 0

    # ---------------------------------------------------------------- failures

    def _fail(self, session, audit: Audit, contribution: Contribution, reason: str,
              verdict: bytes | None = None) -> tuple[str | None, int]:
        """Fail the audit, void the contribution and strike its node (:meth:`Strikes.strike`).

        :returns: (the node id if this strike bans it, samples voided) for :meth:`Strikes.committed`
        """
        audit.state = AuditState.FAILED
        audit.decided_at_ms = now_ms()
        if verdict is None:  # the coordinator's own finding (records check or window)
            audit.validator_node_id = audit.validator_node_id or COORDINATOR
            audit.verdict = pb.AuditVerdict(task_id=audit.task_id, validator_node_id=COORDINATOR, passed=False,
                                             reason=reason, created_at_ms=audit.decided_at_ms
                                             ).SerializeToString(deterministic=True)
        return self.strikes.strike(session, audit, contribution, reason)
