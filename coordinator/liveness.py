"""Which nodes are online: the latest heartbeat of every node, in memory, flushed to the store periodically.

Heartbeats are the coordinator's busiest write (one per node every few seconds), so they update a
dict and a background task upserts the changed rows in one transaction; a crash loses at most one
flush interval of heartbeats, which only delays when a node counts as offline.
"""

import logging
from dataclasses import dataclass

from omi.coordinator.store import Heartbeat, Store
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

logger = logging.getLogger(__name__)


@dataclass
class Beat:
    """The latest heartbeat of one node in one run."""

    round: int
    samples_per_second: float
    swarm_peers: int
    loss: float
    at_ms: int


class Liveness:
    """Latest heartbeat per (run, node).

    :param store: where heartbeats are flushed to and loaded from at start
    """

    def __init__(self, store: Store):
        self.store = store
        # The latest beat per node: this process's beats at once, other processes' (sharing the database) from
        # the store at every :meth:`refresh` (each metrics interval); a newer beat replaces an older one, whichever
        # process received it.
        self._beats: dict[str, dict[str, Beat]] = {}  # run_id -> node_id -> Beat
        self._dirty: set[tuple[str, str]] = set()
        self.refresh()

    def refresh(self) -> int:
        """Take the beats in the store that are newer than the ones held here; returns how many were."""
        newer = 0
        with self.store.session() as s:
            rows = s.execute(select(Heartbeat.run_id, Heartbeat.node_id, Heartbeat.round, Heartbeat.samples_per_second,
                                    Heartbeat.swarm_peers, Heartbeat.loss, Heartbeat.at_ms)).all()
        for run_id, node_id, round_number, samples_per_second, swarm_peers, loss, at_ms in rows:
            held = self._beats.get(run_id, {}).get(node_id)
            if (held is None or at_ms > held.at_ms) and (run_id, node_id) not in self._dirty:
                self._beats.setdefault(run_id, {})[node_id] = Beat(round_number, samples_per_second, swarm_peers, loss,
                                                                   at_ms)
                newer += 1
        return newer

    def beat(self, run_id: str, node_id: str, beat: Beat) -> None:
        self._beats.setdefault(run_id, {})[node_id] = beat
        self._dirty.add((run_id, node_id))

    def forget(self, run_id: str, node_id: str) -> None:
        """The node left: it is offline from now on."""
        beat = self._beats.get(run_id, {}).get(node_id)
        if beat is not None:
            beat.at_ms = 0
            self._dirty.add((run_id, node_id))

    def last_seen_ms(self, run_id: str, node_id: str) -> int:
        beat = self._beats.get(run_id, {}).get(node_id)
        return beat.at_ms if beat else 0

    def online(self, run_id: str, now_ms: int, timeout_s: float) -> list[Beat]:
        """Latest beats of the nodes heard from within ``timeout_s``."""
        cutoff = now_ms - int(timeout_s * 1000)
        return [b for b in self._beats.get(run_id, {}).values() if b.at_ms >= cutoff]

    def online_nodes(self, run_id: str, now_ms: int, timeout_s: float) -> set[str]:
        """Ids of the nodes heard from within ``timeout_s``."""
        cutoff = now_ms - int(timeout_s * 1000)
        return {node_id for node_id, b in self._beats.get(run_id, {}).items() if b.at_ms >= cutoff}

    def flush(self) -> int:
        """Upsert the heartbeats changed since the last flush; returns how many rows were written."""
        if not self._dirty:
            return 0
        dirty, self._dirty = self._dirty, set()
        rows = []
        for run_id, node_id in dirty:
            b = self._beats[run_id][node_id]
            rows.append(dict(run_id=run_id, node_id=node_id, round=b.round, samples_per_second=b.samples_per_second,
                             swarm_peers=b.swarm_peers, loss=b.loss, at_ms=b.at_ms))
        dialect = self.store.engine.dialect.name
        insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}.get(dialect)
        try:
            with self.store.transaction() as s:
                if insert is None:  # another database: portable but one SELECT per row
                    for row in rows:
                        s.merge(Heartbeat(**row))
                else:
                    stmt = insert(Heartbeat)
                    columns = ("round", "samples_per_second", "swarm_peers", "loss", "at_ms")
                    update = {c: stmt.excluded[c] for c in columns}
                    s.execute(stmt.on_conflict_do_update(index_elements=["node_id", "run_id"], set_=update), rows)
        except Exception:
            self._dirty |= dirty  # try again at the next flush
            raise
        return len(rows)
