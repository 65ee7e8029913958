"""What a failed audit costs its node: the contribution voided, a strike, and at ``max_strikes`` a ban.

A failed audit voids the contribution and adds a strike; ``verification.max_strikes`` strikes ban the node,
which also voids its provisional (not yet verified) contributions. While a failed audit that an overturned
validator decided is re-examined, its strike and voiding are undone (:meth:`Strikes.lift`). The store changes
happen inside the auditor's transaction (:mod:`omi.coordinator.audit`); :meth:`Strikes.committed` makes the
in-memory ban list and sample total follow once it committed.
"""

import logging

from omi.coordinator.registry import Registry
from omi.coordinator.runs import Runs
from omi.coordinator.states import BanKind, ContributionStatus
from omi.coordinator.store import Audit, Ban, Contribution, Node
from sqlalchemy import select

logger = logging.getLogger(__name__)


class Strikes:
    """Voids, strikes and bans for failed audits, and their undoing while an audit is re-examined.

    :param runs: run specs (max strikes) and sample totals
    :param registry: bans nodes that reach max strikes
    """

    def __init__(self, runs: Runs, registry: Registry):
        self.runs, self.registry = runs, registry

    def strike(self, session, audit: Audit, contribution: Contribution, reason: str) -> tuple[str | None, int]:
        """Inside the transaction that fails ``audit``: void the contribution and strike its node; at max strikes ban
        the node and void its provisional contributions.

        :returns: (the node id if this strike bans it, samples voided) for :meth:`committed`
        """
        voided = self.void(session, contribution)
        node = session.get(Node, audit.node_id)
        node.strikes += 1
        max_strikes = self.runs.get(audit.run_id).spec.verification.max_strikes
        logger.warning("node %s failed an audit of round %d (%s): strike %d of %d", node.node_id[:12], audit.round,
                       reason or "no reason", node.strikes, max_strikes)
        if node.strikes >= max_strikes and self.registry.ban_in(session, node.node_id, f"{node.strikes} failed audits",
                                                                BanKind.FAILED_AUDITS):
            for provisional in session.scalars(select(Contribution).where(
                    Contribution.node_id == node.node_id, Contribution.status == ContributionStatus.ACCEPTED)):
                voided += self.void(session, provisional)
            return node.node_id, voided
        return None, voided

    def lift(self, session, audit: Audit, contribution: Contribution, unbanned: list[str]):
        """Undo a failed audit's strike and voiding while it is re-examined: a ban for failed audits that falls
        below ``max_strikes`` is lifted (the provisional work that ban voided stays voided)."""
        restored = 0
        if contribution.status == ContributionStatus.VOIDED:
            contribution.status = ContributionStatus.ACCEPTED
            self.runs.add_samples(session, contribution.run_id, contribution.samples)
            restored = contribution.samples
        node = session.get(Node, audit.node_id)
        node.strikes = max(0, node.strikes - 1)
        max_strikes = self.runs.get(audit.run_id).spec.verification.max_strikes
        ban = session.get(Ban, node.node_id)
        if ban is not None and node.strikes < max_strikes and ban.kind == BanKind.FAILED_AUDITS:
            session.delete(ban)
            unbanned.append(node.node_id)
            logger.warning("node %s: ban lifted while its failed audit is re-examined", node.node_id[:12])
        return None, -restored

    def void(self, session, contribution: Contribution) -> int:
        """Void a contribution inside the transaction; returns the samples taken off the run's total."""
        if contribution.status == ContributionStatus.VOIDED:
            return 0
        contribution.status = ContributionStatus.VOIDED
        self.runs.add_samples(session, contribution.run_id, -contribution.samples)
        return contribution.samples

    def committed(self, run_id: str, failure: tuple[str | None, int] | None) -> None:
        """Once a failing transaction committed: the in-memory ban list and sample total follow the store."""
        if failure is None:
            return
        banned, voided = failure
        if banned:
            self.registry.banned_committed(banned)
        self.runs.samples_committed(run_id, -voided)
