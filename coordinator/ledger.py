"""The contribution ledger: one signed Contribution per (node, run, round), checked against its assignment.

Credit is verified samples. A contribution is ``accepted`` (provisional) when it arrives, ``verified`` when its
audit passed or its audit window (``verification.audit_window_rounds``) closed without a failed audit, and
``voided`` when an audit failed or its node was banned while it was still provisional
(:class:`omi.coordinator.states.ContributionStatus`). Only verified samples count as a volunteer's credit.
"""

import logging
import math
import uuid
from collections import Counter

from omi.coordinator.audit import Auditor
from omi.coordinator.errors import (
    AlreadyExists,
    CoordinatorError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from omi.coordinator.registry import Caller
from omi.coordinator.runs import Runs
from omi.coordinator.states import ContributionStatus
from omi.coordinator.store import Contribution, Store, WorkAssignment, int_sum
from omi.models.segments import segment_steps
from omi.protos import pb, signing
from omi.protos.clock import now_ms
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

logger = logging.getLogger(__name__)

THROUGHPUT_WINDOW_MS = 60_000  # the run's throughput is the ledger's growth over this last window


class Ledger:
    """Records contributions.

    :param store: the database
    :param runs: run states and sample totals
    :param auditor: samples each new contribution for audit in the same transaction
    """

    def __init__(self, store: Store, runs: Runs, auditor: Auditor):
        self.store, self.runs, self.auditor = store, runs, auditor
        # (run id, status code name) -> contributions this process refused since it started: a Prometheus counter
        # of this process (two coordinator processes each count their own), never in the store
        self.refused: Counter[tuple[str, str]] = Counter()

    def report(self, caller: Caller, contribution: pb.Contribution) -> tuple[str, str]:
        """Check and store a contribution; returns its id and the audit task id ("" if not audited).

        A second report for the round is AlreadyExists. Reports also move the run's audit windows on.
        """
        try:
            return self._record(caller, contribution)
        except CoordinatorError as e:
            self.refused[(caller.run_id, e.code)] += 1
            raise

    def _record(self, caller: Caller, contribution: pb.Contribution) -> tuple[str, str]:
        self._check(caller, contribution)
        with self.store.session() as s:
            if s.scalar(select(Contribution.contribution_id).where(
                    Contribution.node_id == caller.node_id, Contribution.run_id == caller.run_id,
                    Contribution.round == contribution.round)) is not None:
                raise AlreadyExists(f"node {caller.node_id[:12]} already reported round {contribution.round}")
            assignment = s.get(WorkAssignment, contribution.assignment_id)
        if assignment is None:
            raise NotFound(f"no assignment {contribution.assignment_id!r}")
        if (assignment.node_id, assignment.run_id, assignment.round) != (caller.node_id, caller.run_id,
                                                                          contribution.round):
            raise InvalidArgument("the assignment belongs to another node, run or round")
        if assignment.released_at_ms is not None:
            raise FailedPrecondition("the assignment was released after missed heartbeats; ask for new work")
        if contribution.samples > assignment.num_samples:  # a round never goes past its assignment
            raise InvalidArgument(f"samples {contribution.samples} exceed the assignment's {assignment.num_samples}")
        row = Contribution(contribution_id=uuid.uuid4().hex, run_id=caller.run_id, node_id=caller.node_id,
                           round=contribution.round, assignment_id=contribution.assignment_id,
                           samples=contribution.samples, mean_loss=contribution.mean_loss,
                           compute_seconds=contribution.compute_seconds, status=ContributionStatus.ACCEPTED,
                           message=contribution.SerializeToString(deterministic=True), received_at_ms=now_ms())
        try:
            with self.store.transaction() as s:
                s.add(row)
                s.flush()
                self.runs.add_samples(s, caller.run_id, contribution.samples)
                audit = self.auditor.maybe_queue(s, row, contribution.micro_batches)
        except IntegrityError as e:  # a concurrent duplicate got in first
            raise AlreadyExists(f"node {caller.node_id[:12]} already reported round {contribution.round}") from e
        self.runs.samples_committed(caller.run_id, contribution.samples)
        self.auditor.close_windows(caller.run_id)
        return row.contribution_id, audit.task_id if audit is not None else ""

    def _check(self, caller: Caller, c: pb.Contribution) -> None:
        if c.node_id != caller.node_id or c.run_id != caller.run_id:
            raise PermissionDenied("the contribution names another node or run than the token")
        if not signing.verify(c, caller.public_key):
            raise InvalidArgument("bad signature on Contribution")
        run = self.runs.get(caller.run_id)
        if run.state == pb.RUN_STATE_STOPPED:
            raise FailedPrecondition(f"run '{caller.run_id}' is stopped", reason=pb.REFUSAL_RUN_STOPPED)
        if c.samples == 0 or c.micro_batches == 0:
            raise InvalidArgument("a contribution needs samples > 0 and micro_batches > 0")
        if not (math.isfinite(c.mean_loss) and math.isfinite(c.compute_seconds) and c.compute_seconds >= 0):
            raise InvalidArgument("mean_loss and compute_seconds must be finite, compute_seconds >= 0")
        segments = -(-c.micro_batches // segment_steps(run.spec)) + 1  # a training-state hash every segment_steps
        if len(c.segment_hashes) != segments or any(len(h) != 32 for h in c.segment_hashes):
            raise InvalidArgument(f"a round of {c.micro_batches} inner steps commits to {segments} training-state "
                                  f"hashes of 32 bytes (segment_hashes), got {len(c.segment_hashes)}")
        if len(c.delta_sketch) > run.spec.verification.sketch_size:
            raise InvalidArgument("delta_sketch longer than verification.sketch_size")
        if len(c.gradient_sketch) > run.spec.verification.sketch_size:
            raise InvalidArgument(f"gradient_sketch longer than verification.sketch_size "
                                  f"({run.spec.verification.sketch_size})")

    def totals(self, run_id: str) -> tuple[int, int]:
        """(contributions not voided, verified samples) of a run."""
        with self.store.session() as s:
            count = s.scalar(select(func.count()).select_from(Contribution).where(
                Contribution.run_id == run_id, Contribution.status != ContributionStatus.VOIDED))
            verified = s.scalar(select(int_sum(Contribution.samples)).where(
                Contribution.run_id == run_id, Contribution.status == ContributionStatus.VERIFIED))
        return count, verified

    def throughput(self, run_id: str, now: int, window_ms: int = THROUGHPUT_WINDOW_MS) -> float:
        """Samples per second the ledger grew by over the last ``window_ms`` (voided contributions excluded): what
        the run really trained, measured here, not the volunteers' own speed figures."""
        with self.store.session() as s:
            samples = s.scalar(select(int_sum(Contribution.samples)).where(
                Contribution.run_id == run_id, Contribution.status != ContributionStatus.VOIDED,
                Contribution.received_at_ms > now - window_ms, Contribution.received_at_ms <= now))
        return samples / (window_ms / 1000)

    def provisional_samples(self, run_id: str) -> int:
        """Samples reported in a run that are neither verified nor voided yet."""
        with self.store.session() as s:
            return s.scalar(select(int_sum(Contribution.samples)).where(
                Contribution.run_id == run_id, Contribution.status == ContributionStatus.ACCEPTED))
