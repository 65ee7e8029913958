"""The coordinator's domain objects wired together over one store and one key; what the servicer calls."""

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from omi.coordinator.audit import Auditor
from omi.coordinator.checkpoints import Checkpoints
from omi.coordinator.config import CoordinatorConfig
from omi.coordinator.credentials import (
    load_or_create_coordinator_key,
)
from omi.coordinator.errors import InvalidArgument
from omi.coordinator.ledger import Ledger
from omi.coordinator.liveness import Beat, Liveness
from omi.coordinator.registry import Caller, Registry
from omi.coordinator.runs import Runs
from omi.coordinator.store import RunMetric, Store, sqlite_url
from omi.coordinator.work import ShardLayout, WorkPlanner, data_layout
from omi.protos import pb, signing
from omi.protos.clock import now_ms

logger = logging.getLogger(__name__)

# a heartbeat's self-reported figures are shown (as claims) beside the measured ones: bounded, finite, non-negative
MAX_SAMPLES_PER_SECOND = 1e7
MAX_LOSS = 1e6
MAX_ROUND = 2**31 - 1  # a node's round is stored as a signed 32-bit integer (PostgreSQL's INTEGER)

T = TypeVar("T")


class Coordinator:
    """Runs, registry, work planner, ledger, auditor and checkpoints over one store.

    :param store: the database
    :param key: the coordinator's Ed25519 key (signs tokens and assignments; its public half is in every RunSpec)
    :param config: limits and intervals
    :param layout: DataSpec -> ShardLayout, how a run's data splits into shards
    :param swarm_peers: RunSpec -> multiaddrs of the run's hivemind bootstrap peer, put into the RunSpec nodes
      receive (None: no swarm peer)
    :param state_dir: checkpoint folders live in ``state_dir/checkpoints`` (None: none on disk; listing still works)
    :param public_url: base URL of the coordinator's HTTP port (``http://host:port``) for ``Checkpoint.url``
    :param clock: wall-clock milliseconds the registry judges challenges and tokens by, and heartbeats and
        assignments are stamped and judged by (tests move one forward)

    >>> from omi.protos.signing import generate_key
    >>> coordinator = Coordinator(Store("sqlite://"), generate_key())
    >>> coordinator.runs.create('[run]\\nid = "demo"\\nmodel = "unet-digits-16"\\n').state == pb.RUN_STATE_CREATED
    True
    """

    def __init__(self, store: Store, key: Ed25519PrivateKey, config: CoordinatorConfig | None = None, *,
                 layout: Callable[[pb.DataSpec], ShardLayout] = data_layout,
                 swarm_peers: Callable[[pb.RunSpec], list[str]] | None = None, state_dir: str | Path | None = None,
                 public_url: str = "", clock: Callable[[], int] = now_ms):
        self.store, self.key = store, key
        self.config = config or CoordinatorConfig()
        self.public_key = signing.public_bytes(key)
        self.runs = Runs(store, self.public_key, swarm_peers=swarm_peers, public_url=public_url)
        self.liveness = Liveness(store)
        self.registry = Registry(store, key, self.runs, self.liveness, self.config.registry, clock=clock)
        self.work = WorkPlanner(store, key, self.runs, self.liveness, layout=layout, config=self.config.work,
                                clock=clock)
        self.clock = clock  # wall-clock ms: heartbeats are stamped and judged by it
        self.auditor = Auditor(store, self.runs, self.registry, task_timeout=self.config.audit_task_timeout,
                               records_grace=self.config.records_grace)
        self.ledger = Ledger(store, self.runs, self.auditor)
        self.checkpoints = Checkpoints(store, self.runs, state_dir, public_url)
        # The servers run every domain call in this one thread (see :meth:`call`): off the event loop, which stays
        # free for I/O, and one at a time, as the domain objects expect.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coordinator")

    @classmethod
    def open(cls, state_dir: str | Path, db_url: str | None = None, config: CoordinatorConfig | None = None,
             **kwargs) -> "Coordinator":
        """The coordinator of a state dir: its key (created at first start, mode 0600), its database (SQLite in
        the state dir unless ``db_url``) and its checkpoint folders; ``kwargs`` go to the constructor."""
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        coordinator = cls(Store(db_url or sqlite_url(state_dir)), load_or_create_coordinator_key(state_dir), config,
                          state_dir=state_dir, **kwargs)
        coordinator.checkpoints.rename_epoch_folders()  # before the checkpointer or the dashboard looks for them
        return coordinator

    async def call(self, fn: Callable[..., T], /, *args, **kwargs) -> T:
        """``fn(*args, **kwargs)`` run in the coordinator's worker thread, awaited without blocking the event loop.

        Domain calls block (database round trips, opening a run's data source), and the loop also serves the
        dashboard; they run one at a time, in the order they were called, as they did on the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, functools.partial(fn, *args, **kwargs))

    # ---------------------------------------------------------------- node requests

    def heartbeat(self, caller: Caller, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        for name, value, most in (("samples_per_second", request.samples_per_second, MAX_SAMPLES_PER_SECOND),
                                  ("loss", request.loss, MAX_LOSS), ("round", request.round, MAX_ROUND)):
            if not 0.0 <= value <= most:  # also NaN: SQLite would store it as NULL and every later flush fail
                raise InvalidArgument(f"heartbeat {name} must be a number from 0 to {most:g}, not {value!r}")
        self.liveness.beat(caller.run_id, caller.node_id, Beat(request.round, request.samples_per_second,
                                                               request.swarm_peers, request.loss, self.clock()))
        run = self.runs.get(caller.run_id)
        return pb.HeartbeatResponse(run_state=run.state, round=run.round,
                                    token_expires_at_ms=caller.token.expires_at_ms)

    def leave(self, caller: Caller) -> None:
        released = self.work.release_node(caller.run_id, caller.node_id)
        self.liveness.forget(caller.run_id, caller.node_id)
        logger.info("node %s left run %s (%d open assignments released)", caller.node_id[:12], caller.run_id,
                    released)

    # ---------------------------------------------------------------- public views

    def volunteers_online(self, run_id: str) -> list[Beat]:
        return self.liveness.online(run_id, self.clock(), self.runs.get(run_id).spec.liveness.heartbeat_timeout)

    def list_runs(self) -> list[pb.RunSummary]:
        return [self.runs.summary(r, len(self.volunteers_online(r))) for r in self.runs.run_ids()]

    def run_status(self, run_id: str) -> pb.RunStatus:
        online = self.volunteers_online(run_id)
        losses = [b.loss for b in online if b.loss > 0]
        contributions, verified = self.ledger.totals(run_id)
        return pb.RunStatus(summary=self.runs.summary(run_id, len(online)),
                            samples_per_second=self.ledger.throughput(run_id, now_ms()),
                            last_loss=sum(losses) / len(losses) if losses else 0.0,
                            contributions=contributions, verified_samples=verified,
                            provisional_samples=self.ledger.provisional_samples(run_id))

    # ---------------------------------------------------------------- background work

    def record_metrics(self) -> None:
        """One point of history per running run: loss, samples/s, volunteers online."""
        now = now_ms()
        points = []
        for run_id in self.runs.run_ids():
            info = self.runs.get(run_id)
            if info.state != pb.RUN_STATE_RUNNING:
                continue
            status = self.run_status(run_id)
            points.append(RunMetric(run_id=run_id, at_ms=now, round=info.round, total_samples=info.total_samples,
                                    loss=status.last_loss or None, samples_per_second=status.samples_per_second,
                                    volunteers_online=status.summary.volunteers_online))
        if points:
            with self.store.transaction() as s:
                s.add_all(points)

    def sync_with_store(self) -> None:
        """Write the heartbeats held in memory; re-read runs and bans, which another process may have changed."""
        self.liveness.flush()
        self.runs.refresh()
        self.registry.refresh_bans()

    def record_history(self) -> None:
        """Take other processes' heartbeats (a full read of the table, so less often), then record run history."""
        self.liveness.refresh()
        self.record_metrics()

    async def maintain(self) -> None:
        """Sync with the store every flush interval and record run history every metrics interval, until cancelled."""
        last_metrics = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.flush_interval)
            try:
                await self.call(self.sync_with_store)
                if loop.time() - last_metrics >= self.config.metrics_interval:
                    last_metrics = loop.time()
                    await self.call(self.record_history)
            except Exception:
                logger.exception("background flush failed; retrying at the next interval")

    def close(self) -> None:
        """Finish the calls under way in the worker thread, flush what is in memory and close the database."""
        self._worker.shutdown(wait=True)
        self.liveness.flush()
        self.store.close()
