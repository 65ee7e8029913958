"""Work assignment: which data shards a node trains on in a round, and the seed its noise derives from.

For (run, round, node) the choice is deterministic given which shards are already taken: the round's
shards are put in an order seeded by (run seed, run, round), and a node walks that order from a
position derived from its id, taking the first free shards. The assignment is stored, so asking
again returns it unchanged. The primary key of ``assigned_shards`` is what makes double
assignment impossible. When free shards run short, the shards of nodes that missed their heartbeats
(and reported nothing) go back to the pool.

Against identities made by the dozen (issue 12, point 6: ten fresh identities took all 29 shards of a round and
left the honest node none): one source address holds at most ``max_assignments_per_address`` assignments per
round, and an identity without verified work in the run is on **probation**: it gets only its own
share of a round (``inner_steps × micro_batch_size``, not the 2× slack a fast node may use) and its contributions
are audited at twice the run's rate (:mod:`omi.coordinator.audit`), until some of its work is verified.
"""

import hashlib
import logging
import random
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from omi.coordinator.config import WorkConfig
from omi.coordinator.errors import FailedPrecondition, Unavailable
from omi.coordinator.liveness import Liveness
from omi.coordinator.registry import Caller
from omi.coordinator.runs import Runs
from omi.coordinator.store import (
    AssignedShard,
    AssignmentSource,
    Contribution,
    Store,
    WorkAssignment,
    has_verified_contribution,
)
from omi.protos import pb, signing
from omi.protos.clock import now_ms
from sqlalchemy import delete, exists, func, select

logger = logging.getLogger(__name__)

# Work is handed out for at most this many rounds past the run's: the run's round follows the coordinator's witness
# (written by the checkpointer process, read here every flush interval), which may trail the trainers by a round.
MAX_AHEAD = 2


@dataclass(frozen=True)
class ShardLayout:
    """How a run's data splits into numbered shards."""

    num_shards: int
    shard_range: Callable[[int], tuple[int, int]]  # shard id -> (first sample, end sample exclusive)


def uniform_layout(num_samples: int, shard_size: int) -> ShardLayout:
    """Shards of ``shard_size`` consecutive samples, the last one shorter."""
    num_shards = -(-num_samples // shard_size)
    return ShardLayout(num_shards, lambda i: (i * shard_size, min(num_samples, (i + 1) * shard_size)))


def data_layout(data: pb.DataSpec) -> ShardLayout:
    """The shard layout of a run's data source, from ``omi.models.data``."""
    from omi.models.data import open_source  # imported late: it pulls in torch and the data libraries

    source = open_source(data)
    return ShardLayout(source.num_shards, source.shard_range)


def samples_per_assignment(spec: pb.RunSpec, num_samples: int = 0, volunteers: int = 1, *,
                           probation: bool = False) -> int:
    """Samples one assignment should hold.

    Twice a node's share of a round (``inner_steps × micro_batch_size``), so a node faster than the others can keep
    computing until the round closes — but no more than an equal share of the data (``num_samples``) among the
    ``volunteers`` online, so that on a small data set the first volunteers do not take a round's whole pool and
    leave the others idle. On ``probation`` (no verified work yet) a node gets no slack: one share of a round.

    >>> spec = pb.RunSpec(training=pb.TrainingSpec(micro_batch_size=32), rounds=pb.RoundsSpec(inner_steps=20))
    >>> samples_per_assignment(spec), samples_per_assignment(spec, 1797, 2)
    (1280, 898)
    >>> samples_per_assignment(spec, 1797, 2, probation=True)
    640
    """
    share = (1 if probation else 2) * spec.rounds.inner_steps * spec.training.micro_batch_size
    if num_samples:
        share = min(share, max(num_samples // max(volunteers, 1), spec.training.micro_batch_size))
    return share


def derive_seed(*parts) -> int:
    """A 63-bit seed from the parts (63 bits so it fits a signed 64-bit column)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@lru_cache(maxsize=16)
def _shard_order(run_seed: int, run_id: str, round_number: int, num_shards: int) -> tuple[int, ...]:
    order = list(range(num_shards))
    random.Random(derive_seed(run_seed, run_id, round_number, "shards")).shuffle(order)
    return tuple(order)


class WorkPlanner:
    """Hands out WorkAssignments.

    :param store: the database
    :param key: the coordinator's key, which signs assignments
    :param runs: run specs and states
    :param liveness: to tell which assigned nodes went offline
    :param layout: DataSpec -> ShardLayout (``data_layout`` reads the real data source)
    :param config: per-address caps
    :param clock: wall-clock milliseconds (assignments' times, who is online; tests move one forward)
    """

    def __init__(self, store: Store, key: Ed25519PrivateKey, runs: Runs, liveness: Liveness, *,
                 layout: Callable[[pb.DataSpec], ShardLayout] = data_layout, config: WorkConfig | None = None,
                 clock: Callable[[], int] = now_ms):
        self.store, self.key, self.runs, self.liveness, self.clock = store, key, runs, liveness, clock
        self.config = config or WorkConfig()
        self._layout = layout
        # Run id -> its layout, opened once: a run's DataSpec never changes, so an entry never goes stale, in this
        # process or another. The lock lets :meth:`layout` be called from any thread (the server opens a run's
        # data in a thread of its own when the run starts); a second caller waits for the first one's result.
        self._layouts: dict[str, ShardLayout] = {}
        self._layouts_lock = threading.Lock()

    def layout(self, run_id: str) -> ShardLayout:
        """The run's shard layout, opening its data source (which may decode every image) on first use."""
        with self._layouts_lock:
            if run_id not in self._layouts:
                data = self.runs.get(run_id).spec.data
                try:
                    self._layouts[run_id] = self._layout(data)
                except (ValueError, OSError) as e:
                    raise FailedPrecondition(f"cannot open the data source {data.source!r} of run '{run_id}': "
                                             f"{e}") from e
            return self._layouts[run_id]

    def get_work(self, caller: Caller, round_number: int, source: str = "") -> pb.WorkAssignment:
        """The caller's assignment for ``round_number``: the stored one if it has it, else a new one.

        :param source: the address the request came from ("": not counted against a per-address cap)
        """
        run = self.runs.get(caller.run_id)
        if run.state == pb.RUN_STATE_STOPPED:
            raise FailedPrecondition(f"run '{caller.run_id}' is stopped", reason=pb.REFUSAL_RUN_STOPPED)
        if run.state != pb.RUN_STATE_RUNNING:
            raise FailedPrecondition(f"run '{caller.run_id}' is not running", reason=pb.REFUSAL_RUN_NOT_RUNNING)
        if run.spec.training.max_rounds and round_number >= run.spec.training.max_rounds:
            raise FailedPrecondition(f"run '{caller.run_id}' ends before round {round_number}",
                                     reason=pb.REFUSAL_RUN_ENDED)
        if round_number > run.round + MAX_AHEAD:  # the run's round is what the coordinator's witness observed, no claim
            raise Unavailable(f"round {round_number} is ahead of the run (round {run.round}); retry once the swarm is "
                              "there")
        with self.store.session() as s:
            stored = s.scalar(select(WorkAssignment.message).where(
                WorkAssignment.run_id == caller.run_id, WorkAssignment.round == round_number,
                WorkAssignment.node_id == caller.node_id, WorkAssignment.released_at_ms.is_(None)))
        assignment = (pb.WorkAssignment.FromString(stored) if stored is not None
                      else self._assign(caller, round_number, source))
        # what the witness holds at this round's start, once it is published
        assignment.state_hash = self.runs.round_state(caller.run_id, round_number) or ""
        return assignment

    def _assign(self, caller: Caller, round_number: int, source: str) -> pb.WorkAssignment:
        run = self.runs.get(caller.run_id)
        layout = self.layout(caller.run_id)
        now = self.clock()
        assignment = pb.WorkAssignment(run_id=caller.run_id, round=round_number, node_id=caller.node_id,
                                       micro_batch_size=run.spec.training.micro_batch_size, run_state=run.state)
        training = run.spec.training
        with self.store.transaction() as s:
            cap = self.config.max_assignments_per_address
            if cap and source and self._held_by(s, caller.run_id, round_number, source) >= cap:
                # like a round whose data is all taken: the node averages without data and asks again later
                logger.warning("address %s holds %d assignments of run %s round %d already (the cap): none for node "
                               "%s", source, cap, caller.run_id, round_number, caller.node_id[:12])
                return assignment
            needed = samples_per_assignment(run.spec, layout.shard_range(layout.num_shards - 1)[1],
                                            self._volunteers(caller),
                                            probation=not has_verified_contribution(s, caller.run_id, caller.node_id))
            wanted = max(training.shards_per_assignment, -(-needed // run.spec.data.shard_size))
            chosen = self._pick_free(s, caller, round_number, wanted)
            if len(chosen) < wanted and self._release_offline(s, caller.run_id, round_number, now):
                chosen = self._pick_free(s, caller, round_number, wanted)
            while chosen and self._samples(layout, chosen) < needed:
                more = self._pick_free(s, caller, round_number, 1, exclude=frozenset(chosen))
                if not more:
                    break  # the round's data is nearly all taken: the node trains on less
                chosen += more
            if not chosen:
                # Every shard of this round is taken: the node averages with the swarm without data of its own
                # and asks again later (shards come back when their nodes go offline). Nothing is stored.
                logger.info("no free shard in run %s round %d for node %s", caller.run_id, round_number,
                            caller.node_id[:12])
                return assignment
            assignment.assignment_id = uuid.uuid4().hex
            assignment.seed = derive_seed(run.spec.training.seed, caller.run_id, round_number, caller.node_id)
            for shard in sorted(chosen):
                begin, end = layout.shard_range(shard)
                assignment.shards.add(shard_id=shard, start=begin, end=end)
            signing.sign(assignment, self.key)
            s.add(WorkAssignment(assignment_id=assignment.assignment_id, run_id=caller.run_id, round=round_number,
                                 node_id=caller.node_id, num_samples=sum(r.end - r.start for r in assignment.shards),
                                 seed=assignment.seed, message=assignment.SerializeToString(deterministic=True),
                                 created_at_ms=now))
            s.flush()
            if source:
                s.add(AssignmentSource(assignment_id=assignment.assignment_id, run_id=caller.run_id, round=round_number,
                                       address=source))
            s.add_all([AssignedShard(run_id=caller.run_id, round=round_number, shard_id=shard,
                                     assignment_id=assignment.assignment_id) for shard in chosen])
        return assignment

    @staticmethod
    def _held_by(session, run_id: str, round_number: int, address: str) -> int:
        """Assignments of the run's ``round_number`` asked for from ``address`` and not released."""
        return session.scalar(select(func.count()).select_from(AssignmentSource).join(
            WorkAssignment, WorkAssignment.assignment_id == AssignmentSource.assignment_id).where(
            AssignmentSource.run_id == run_id, AssignmentSource.round == round_number,
            AssignmentSource.address == address, WorkAssignment.released_at_ms.is_(None)))

    def _volunteers(self, caller: Caller) -> int:
        """Training volunteers online in the caller's run (they heartbeat; validators do not), the caller included."""
        run = self.runs.get(caller.run_id)
        online = self.liveness.online_nodes(caller.run_id, self.clock(), run.spec.liveness.heartbeat_timeout)
        return len(online | {caller.node_id})

    @staticmethod
    def _samples(layout: ShardLayout, shards: list[int]) -> int:
        return sum(end - begin for begin, end in map(layout.shard_range, shards))

    def _pick_free(self, session, caller: Caller, round_number: int, wanted: int,
                   exclude: frozenset[int] = frozenset()) -> list[int]:
        """Walk the round's shard order from the node's own position; the first ``wanted`` free shards.

        Candidates are checked in small batches, so a call costs about ``wanted`` lookups while shards are free."""
        run = self.runs.get(caller.run_id)
        num_shards = self.layout(caller.run_id).num_shards
        order = _shard_order(run.spec.training.seed, caller.run_id, round_number, num_shards)
        start = derive_seed(caller.run_id, round_number, caller.node_id) % num_shards
        chosen: list[int] = []
        position, batch = 0, max(16, 2 * wanted)
        while len(chosen) < wanted and position < num_shards:
            candidates = [order[(start + position + i) % num_shards] for i in range(min(batch, num_shards - position))]
            position += len(candidates)
            taken = set(session.scalars(select(AssignedShard.shard_id).where(
                AssignedShard.run_id == caller.run_id, AssignedShard.round == round_number,
                AssignedShard.shard_id.in_(candidates))))
            free = [shard for shard in candidates if shard not in taken and shard not in exclude]
            chosen += free[: wanted - len(chosen)]
        return chosen

    def _release_offline(self, session, run_id: str, round_number: int, now: int) -> int:
        """Put back the shards of this round's assignments whose node missed its heartbeats and reported nothing.

        Called when free shards run short, so the scan over the round's assignments happens only then."""
        timeout_ms = int(self.runs.get(run_id).spec.liveness.heartbeat_timeout * 1000)
        open_assignments = session.execute(select(WorkAssignment.assignment_id, WorkAssignment.node_id).where(
            WorkAssignment.run_id == run_id, WorkAssignment.round == round_number,
            WorkAssignment.released_at_ms.is_(None),
            ~exists().where(Contribution.assignment_id == WorkAssignment.assignment_id))).all()
        released = 0
        for assignment_id, node_id in open_assignments:
            if now - self.liveness.last_seen_ms(run_id, node_id) > timeout_ms:
                self.release(session, assignment_id, now)
                released += 1
                logger.info("node %s missed its heartbeats: shards of run %s round %d back in the pool",
                            node_id[:12], run_id, round_number)
        return released

    def release(self, session, assignment_id: str, now: int) -> None:
        session.get(WorkAssignment, assignment_id).released_at_ms = now
        session.execute(delete(AssignedShard).where(AssignedShard.assignment_id == assignment_id))

    def release_node(self, run_id: str, node_id: str) -> int:
        """The node left: put back the shards of its assignments that have no contribution yet."""
        now = self.clock()
        with self.store.transaction() as s:
            ids = list(s.scalars(select(WorkAssignment.assignment_id).where(
                WorkAssignment.run_id == run_id, WorkAssignment.node_id == node_id,
                WorkAssignment.released_at_ms.is_(None),
                ~exists().where(Contribution.assignment_id == WorkAssignment.assignment_id))))
            for assignment_id in ids:
                self.release(session=s, assignment_id=assignment_id, now=now)
        return len(ids)
