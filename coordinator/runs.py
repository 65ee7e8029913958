"""Runs: created from a RunSpec TOML, lifecycle created -> running <-> paused -> stopped, and the spec handed out.

The parsed RunSpec is stored once; what nodes receive is that spec plus the coordinator's public key
and the swarm's initial peers, which belong to the running server (the ``swarm_peers`` argument).
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omi.coordinator.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from omi.coordinator.states import RUN_STATE_NAMES
from omi.coordinator.store import RoundState, Run, Store
from omi.protos import pb
from omi.protos.clock import now_ms
from omi.protos.data_ref import DataRef
from omi.protos.dataset import DATASET_MANIFEST_NAME
from omi.protos.files import sha256_file
from omi.protos.runspec import RunSpecError, parse_runspec
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

logger = logging.getLogger(__name__)

S = pb.RunState
KEPT_ROUND_STATES = 64  # published round state hashes kept per run

# action -> (states it may start from, state it leads to)
TRANSITIONS = {
    "pause": ({S.RUN_STATE_RUNNING}, S.RUN_STATE_PAUSED),
    "resume": ({S.RUN_STATE_PAUSED, S.RUN_STATE_CREATED}, S.RUN_STATE_RUNNING),  # resuming a created run starts it
    "stop": ({S.RUN_STATE_CREATED, S.RUN_STATE_RUNNING, S.RUN_STATE_PAUSED}, S.RUN_STATE_STOPPED),
}


@dataclass
class RunInfo:
    """What the coordinator keeps in memory of one run (the store is the source of truth)."""

    spec: pb.RunSpec
    state: int
    round: int
    total_samples: int
    created_at_ms: int


def data_url_path(run_id: str) -> str:
    """Where the coordinator's HTTP port serves a run's prepared data set."""
    return f"/runs/{run_id}/data"


class Runs:
    """All runs of this coordinator.

    :param store: the database
    :param coordinator_public_key: raw Ed25519 key put into every RunSpec handed out
    :param swarm_peers: RunSpec -> multiaddrs of the run's hivemind bootstrap peer (None: no swarm peer)
    """

    def __init__(self, store: Store, coordinator_public_key: bytes, *,
                 swarm_peers: Callable[[pb.RunSpec], list[str]] | None = None, public_url: str = ""):
        self.store, self.coordinator_public_key, self.swarm_peers = store, coordinator_public_key, swarm_peers
        self.public_url = public_url.rstrip("/")  # the HTTP port nodes fetch a prepared data set's shards from
        # A cache of the runs table: a spec never changes once stored; state, round and samples follow this
        # process's own writes as they commit, and :meth:`refresh` (every flush interval) re-reads them and picks
        # up runs created elsewhere, so a change by another coordinator process on the same database shows here
        # within that interval.
        self._runs: dict[str, RunInfo] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read every run's state, round and sample count from the store, and load runs created elsewhere."""
        with self.store.session() as s:
            rows = s.execute(select(Run.run_id, Run.state, Run.round, Run.total_samples, Run.created_at_ms)).all()
            new = [row.run_id for row in rows if row.run_id not in self._runs]
            specs = dict(s.execute(select(Run.run_id, Run.spec).where(Run.run_id.in_(new))).all()) if new else {}
        for row in rows:
            info = self._runs.get(row.run_id)
            if info is None:
                self._runs[row.run_id] = RunInfo(pb.RunSpec.FromString(specs[row.run_id]), row.state, row.round,
                                                 row.total_samples, row.created_at_ms)
            else:  # the round only grows: a concurrent advance may have moved it past what was read
                info.state, info.round, info.total_samples = row.state, max(info.round, row.round), row.total_samples

    def create(self, spec_toml: str, *, start: bool = False) -> pb.RunSummary:
        """Parse and store a new run; a bad TOML key or value is InvalidArgument naming the key."""
        try:
            spec = parse_runspec(spec_toml)
        except RunSpecError as e:
            raise InvalidArgument(str(e)) from e
        if spec.run_id in self._runs:
            raise AlreadyExists(f"run '{spec.run_id}' already exists")
        state = S.RUN_STATE_RUNNING if start else S.RUN_STATE_CREATED
        now = now_ms()
        try:
            with self.store.transaction() as s:
                s.add(Run(run_id=spec.run_id, name=spec.name, model=spec.model, state=state,
                          spec=spec.SerializeToString(deterministic=True), spec_toml=spec_toml, round=0,
                          total_samples=0, created_at_ms=now, updated_at_ms=now))
        except IntegrityError as e:  # another coordinator process created it first
            raise AlreadyExists(f"run '{spec.run_id}' already exists") from e
        self._runs[spec.run_id] = RunInfo(spec, state, 0, 0, now)
        logger.info("created run %s (%s), state %s", spec.run_id, spec.model, RUN_STATE_NAMES[state])
        return self.summary(spec.run_id)

    def transition(self, run_id: str, action: str) -> pb.RunSummary:
        """Apply ``pause``, ``resume`` or ``stop``; a transition the lifecycle forbids is FailedPrecondition."""
        info = self.get(run_id)
        allowed_from, target = TRANSITIONS[action]
        with self.store.transaction() as s:
            row = s.get(Run, run_id, with_for_update=True)  # the stored state: another process may have moved it
            info.state = row.state
            if row.state not in allowed_from:
                raise FailedPrecondition(f"cannot {action} run '{run_id}': it is {RUN_STATE_NAMES[row.state]}")
            row.state, row.updated_at_ms = target, now_ms()
        info.state = target
        logger.info("run %s is now %s", run_id, RUN_STATE_NAMES[target])
        return self.summary(run_id)

    def get(self, run_id: str) -> RunInfo:
        info = self._runs.get(run_id)
        if info is None:
            raise NotFound(f"no run '{run_id}'", reason=pb.REFUSAL_UNKNOWN_RUN)
        return info

    def exists(self, run_id: str) -> bool:
        return run_id in self._runs

    def run_ids(self) -> list[str]:
        return sorted(self._runs, key=lambda r: self._runs[r].created_at_ms)

    def spec_for_nodes(self, run_id: str) -> pb.RunSpec:
        """The RunSpec as nodes receive it: with the coordinator's public key and the initial peers."""
        spec = pb.RunSpec()
        spec.CopyFrom(self.get(run_id).spec)
        spec.coordinator_public_key = self.coordinator_public_key
        if self.swarm_peers is not None:
            spec.initial_peers.extend(self.swarm_peers(spec))
            # this server's checkpointer process witnesses every round's all-reduce (omi.swarm.witness)
            spec.witnessed = True
        folder = self.data_folder(run_id)
        if folder is not None and self.public_url:
            # a prepared data set in a folder here: nodes fetch the shards they are assigned from this coordinator's
            # HTTP port, and the manifest's sha256 pins what they may accept
            digest = sha256_file(folder / DATASET_MANIFEST_NAME)
            spec.data.source = str(DataRef("manifest", f"{self.public_url}{data_url_path(run_id)}", digest))
        return spec

    def data_folder(self, run_id: str) -> Path | None:
        """The folder of the run's prepared data set when it is on this machine (``manifest:FOLDER``), which the
        HTTP port serves under :func:`data_url_path`; None for any other data source (a built-in one, or a
        ``manifest:URL`` this coordinator does not hold)."""
        return DataRef.parse(self.get(run_id).spec.data.source).folder

    def advance(self, run_id: str, round_number: int, state_hash: str | None = None) -> None:
        """The coordinator's own swarm peer observed the run at ``round_number``: the run's round follows, never
        backwards. Only the checkpointer process calls this (its witness of each round's all-reduce); no node's
        claim moves the run. ``state_hash``: the hash of θ at that round, as the witness computed it (published for
        late joiners; the newest :data:`KEPT_ROUND_STATES` are kept)."""
        info = self.get(run_id)
        with self.store.transaction() as s:
            row = s.get(Run, run_id, with_for_update=True)
            row.round = max(row.round, round_number)
            if state_hash is not None:
                s.merge(RoundState(run_id=run_id, round=round_number, state_hash=state_hash, at_ms=now_ms()))
                s.execute(delete(RoundState).where(RoundState.run_id == run_id,
                                                   RoundState.round <= round_number - KEPT_ROUND_STATES))
            info.round = max(info.round, row.round)

    def round_state(self, run_id: str, round_number: int) -> str | None:
        """The published hash of round ``round_number``'s start state θ (None: not witnessed, or long ago)."""
        with self.store.session() as s:
            return s.scalar(select(RoundState.state_hash).where(RoundState.run_id == run_id,
                                                                RoundState.round == round_number))

    def add_samples(self, session, run_id: str, samples: int) -> None:
        """Add to the run's sample count inside the caller's transaction; ``samples_committed`` once it is."""
        # an increment in SQL, so two coordinator processes adding at once both count
        session.execute(update(Run).where(Run.run_id == run_id).values(total_samples=Run.total_samples + samples))

    def samples_committed(self, run_id: str, samples: int) -> None:
        self.get(run_id).total_samples += samples

    def summary(self, run_id: str, volunteers_online: int = 0) -> pb.RunSummary:
        info = self.get(run_id)
        return pb.RunSummary(run_id=run_id, name=info.spec.name, model=info.spec.model, state=info.state,
                             round=info.round, total_samples=info.total_samples, volunteers_online=volunteers_online,
                             created_at_ms=info.created_at_ms)
