"""How a peer that does not train — a validator — follows the swarm's θ_r, and the progress records all read.

A :class:`SwarmFollower` holds the run's round averager (:func:`omi.swarm.round_averager.make_round_averager`),
so the volunteers' ``rpc_download_state`` answers it with (round, θ_r, outer momentum). It never averages, never
offers its state (a joining volunteer must load θ from trainers, never from a follower that may lag a round behind)
and reports no training progress (it is not counted as a training peer). It reads the swarm's round from the progress
records hivemind's trackers publish in the DHT and pulls the state when asked::

    follower = SwarmFollower(dht, spec, model)
    if follower.swarm_round() > follower.round:
        follower.pull(timeout=600)          # model now holds the newest θ_r a volunteer serves
"""

from __future__ import annotations

import logging

import hivemind
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator
from hivemind.optim.progress_tracker import LocalTrainingProgress, TrainingProgressSchema
from omi.protos import pb
from omi.swarm.diloco import read_served, reset_to
from omi.swarm.round_averager import make_round_averager

logger = logging.getLogger(__name__)

READ_TIMEOUT = 30.0  # seconds one read of the progress records may take


def progress_key(spec: pb.RunSpec) -> str:
    """The DHT key under which each training peer's hivemind ``ProgressTracker`` publishes its round."""
    return f"{spec.dht_prefix}_progress"


def add_progress_validators(dht: hivemind.DHT, spec: pb.RunSpec) -> None:
    """The validators hivemind's ProgressTracker adds: its records are signed, and without these a DHT that tracks
    no progress of its own cannot decode them."""
    dht.add_validators([SchemaValidator(TrainingProgressSchema, prefix=spec.dht_prefix), RSASignatureValidator()])


def read_progress(dht: hivemind.DHT, spec: pb.RunSpec) -> list[LocalTrainingProgress]:
    """The progress record each training peer's hivemind ``ProgressTracker`` publishes (records expire 60 s after
    their last refresh); [] when none can be read."""
    try:
        found = dht.get(progress_key(spec), latest=True, return_future=True).result(READ_TIMEOUT)
    except Exception as e:  # a DHT that does not answer now may answer at the next call
        logger.warning("could not read the swarm's progress: %r", e)
        return []
    if found is None or not isinstance(found.value, dict):
        return []
    records = []
    for entry in found.value.values():
        try:
            records.append(LocalTrainingProgress.parse_obj(entry.value))
        except Exception:  # a malformed record says nothing about the swarm
            continue
    return records


class SwarmFollower:
    """A non-training peer's view of the swarm state; create it in the main thread of its process.

    :param dht: the peer's DHT of the run
    :param spec: the run
    :param model: receives the swarm's parameters on :meth:`pull` (built with ``omi.models.build_for_spec``)
    """

    def __init__(self, dht: hivemind.DHT, spec: pb.RunSpec, model: torch.nn.Module):
        self.dht, self.spec, self.model = dht, spec, model
        add_progress_validators(dht, spec)
        self._swarm_round = self._round = 0
        # it serves no state, and waits a round's averaging_timeout for each chunk of the state it pulls (no round's
        # clock runs against it)
        self.averager = make_round_averager(
            spec, dht, deltas=[p.detach().to("cpu", torch.float32, copy=True) for p in model.parameters()
                               if p.requires_grad],
            allow_state_sharing=False, next_chunk_timeout=spec.averaging.averaging_timeout)

    @property
    def round(self) -> int:
        """The round of the θ this follower holds (0 before the first pull)."""
        return self._round

    def swarm_round(self) -> int:
        """The newest round a training peer reports in the DHT (0 when none ever did; the last one read when the
        DHT does not answer)."""
        rounds = [record.epoch for record in read_progress(self.dht, self.spec)]
        self._swarm_round = max([self._swarm_round, *rounds])
        return self._swarm_round

    def pull(self, timeout: float) -> int:
        """Download the newest θ_r a training peer serves (if any answers within ``timeout``); returns its round."""
        loaded = self.averager.load_state_from_peers(timeout=timeout)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if loaded is None:
            return self._round
        served = read_served(*loaded, [p.shape for p in params])
        if served is None:
            logger.warning("a peer served a round state of the wrong shape; ignored")
            return self._round
        reset_to(params, served.theta)  # θ_r; the outer momentum is not needed
        self._round = served.round
        return self._round

    def shutdown(self) -> None:
        self.averager.shutdown()
