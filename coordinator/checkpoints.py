"""Published checkpoints of a run, as listed to nodes and the dashboard (the checkpointer writes them)."""

import logging

from omi.coordinator.runs import Runs
from omi.coordinator.store import Checkpoint, Store
from omi.protos import pb
from sqlalchemy import select

logger = logging.getLogger(__name__)


class Checkpoints:
    """Reads the checkpoints table.

    :param store: the database
    :param runs: to refuse unknown runs
    """

    def __init__(self, store: Store, runs: Runs):
        self.store, self.runs = store, runs

    def list(self, run_id: str) -> list[pb.Checkpoint]:
        """The run's checkpoints, oldest first."""
        self.runs.get(run_id)
        with self.store.session() as s:
            rows = s.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.epoch))
            return [pb.Checkpoint(run_id=r.run_id, epoch=r.epoch, total_samples=r.total_samples,
                                  manifest_sha256=r.manifest_sha256, size_bytes=r.size_bytes,
                                  created_at_ms=r.created_at_ms, path=r.path, milestone=r.milestone) for r in rows]
