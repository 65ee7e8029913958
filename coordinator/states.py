"""The states the coordinator stores as strings and shows: audits, contributions, bans, and names of run states.

Values are what the ``audits.state``, ``contributions.status`` and ``bans.kind`` columns hold; a ``StrEnum``
equals its value, so rows written before these enums existed read the same.

>>> AuditState.PENDING == "pending", AuditState.PENDING in OPEN_AUDIT_STATES
(True, True)
>>> RUN_STATE_NAMES[pb.RUN_STATE_RUNNING]
'running'
"""

import enum

from omi.protos import pb


class AuditState(enum.StrEnum):
    """Where an audit stands (``Audit.state``); see :mod:`omi.coordinator.audit` for the whole life."""

    AWAITING_RECORDS = "awaiting_records"  # sampled; the node has not handed over its records yet
    PENDING = "pending"    # records check passed, waiting for a validator (a first or a second opinion)
    ASSIGNED = "assigned"  # a validator is recomputing it
    DISPUTED = "disputed"  # two validators disagreed: the coordinator's own validator decides
    PASSED = "passed"
    FAILED = "failed"


OPEN_AUDIT_STATES = (AuditState.AWAITING_RECORDS, AuditState.PENDING, AuditState.ASSIGNED,
                     AuditState.DISPUTED)  # no verdict yet


class ContributionStatus(enum.StrEnum):
    """Where a contribution stands (``Contribution.status``); only verified samples are credit."""

    ACCEPTED = "accepted"  # provisional: stored, its audit (if any) and audit window still open
    VERIFIED = "verified"  # its audit passed, or its audit window closed without a failed audit
    VOIDED = "voided"      # its audit failed, or its node was banned while it was provisional


class BanKind(enum.StrEnum):
    """Why a node is banned (``Ban.kind``): what may lift the ban besides an admin's unban."""

    ADMIN = "admin"                  # an admin's ``node ban``: only an unban lifts it
    FAILED_AUDITS = "failed_audits"  # max_strikes failed audits: lifted while a failed audit is re-examined


RUN_STATE_NAMES = {pb.RUN_STATE_CREATED: "created", pb.RUN_STATE_RUNNING: "running", pb.RUN_STATE_PAUSED: "paused",
                   pb.RUN_STATE_STOPPED: "stopped"}  # pb.RunState -> the word the CLI, logs and dashboard show
