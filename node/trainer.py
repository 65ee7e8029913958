"""A volunteer's training loop: one DiLoCo round at a time, reported as one signed contribution.

A round r starts from θ_r, which every honest peer holds bitwise (checked against the hash the coordinator's
witness published). The :class:`Trainer` walks its ``WorkAssignment`` of the round micro-batch by micro-batch, one
inner step each, until the swarm closes the round; the optimizer (:class:`omi.swarm.RoundOptimizer`) then averages
the pseudo-gradients and takes the outer step. The contribution commits to the records of every inner step and to
the hash of the training state every ``verification.segment_steps`` inner steps, so a validator can replay any one
segment from its start state; when the coordinator audits the round, the node hands its records over and keeps the
round's training states for validators.

It gets everything it works with through its constructor: the node's session with the coordinator, the model,
the data and the optimizer (:mod:`omi.node.volunteer` builds them for ``omi-node join``; the lock-step swarm of
the tests builds them in process).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from omi.models import (
    GradientSketch,
    MicroBatchRecord,
    assignment_indices,
    compute_micro_batch,
    merkle_root,
    micro_batch_seed,
    micro_batches,
    params_hash,
    record_to_proto,
    sent_sketch,
)
from omi.models.data import DataSource
from omi.models.segments import RoundStates, segment_steps, training_state
from omi.node.session import REFUSED_CODES, NodeSession
from omi.protos import pb
from omi.protos.refusals import refusal_of
from omi.swarm.params_p2p import ParamsServer
from omi.swarm.rounds import RoundResult

logger = logging.getLogger(__name__)

PAUSED_POLL = 2.0  # seconds between checks of a paused run
RECORDS_KEPT_ROUNDS = 8  # rounds of micro-batch records kept in memory for audits (at least the audit window)
STATE_CHECKS = 3  # tries to start a round from the θ the coordinator witnessed (each one a state load)
WITNESSED_POLL = 0.5  # seconds between two asks for the hash of a loaded θ the coordinator has not published yet


class RunStopped(Exception):
    """The coordinator says the run is over."""


@dataclass
class NodeStatus:
    """What the live view shows; updated by the training loop, read by the view and the heartbeat thread."""

    run_id: str = ""
    node_id: str = ""
    state: str = "starting"
    round: int = 0
    local_samples_per_second: float = 0.0
    swarm_samples_per_second: float = 0.0
    peers: int = 0
    loss: float = math.nan
    samples: int = 0  # samples this node trained on since it joined
    contributions: int = 0  # contributions the coordinator accepted
    last_group_size: int = 0  # trainers in the last round's all-reduce
    utilization: float = 0.0  # compute seconds / wall seconds of the last round
    credited_samples: int = 0


class Trainer:
    """Trains a node's rounds and reports them; one method per behaviour the auditor checks.

    tests/adversaries/ overrides exactly one hook per attack (``_micro_batch``, ``_before_averaging``, ``_commit``,
    ``_hand_over``, ``_hold_segments``).

    :param session: the node's registered session (its client sends work requests and reports)
    :param spec: the run's RunSpec
    :param model: the model, on ``device``, holding the swarm's parameters
    :param scheduler: the run's noise scheduler
    :param source: the run's data
    :param optimizer: the round optimizer (:class:`omi.swarm.RoundOptimizer`, or the lock-step harness's)
    :param params_server: where audited rounds' training states are kept for validators
    :param micro_batch_size: samples per micro-batch
    :param status: the node's status, updated after every micro-batch
    :param on_status: called with the status after every change (the live view)
    :param stop: set to stop after the current micro-batch
    :param segments_dir: where a round's training states go when they are too large for memory
        (:class:`omi.models.segments.RoundStates`); None keeps them in memory
    """

    def __init__(self, session: NodeSession, spec: pb.RunSpec, *, model: torch.nn.Module, scheduler,
                 source: DataSource, optimizer, params_server: ParamsServer, micro_batch_size: int,
                 status: NodeStatus | None = None, on_status: Callable[[NodeStatus], None] | None = None,
                 stop: threading.Event | None = None, segments_dir: Path | None = None):
        self.session, self.client, self.spec = session, session.client, spec
        self.model, self.scheduler, self.source, self.optimizer = model, scheduler, source, optimizer
        self.params_server, self.micro_batch_size = params_server, micro_batch_size
        self.sketch = GradientSketch(model, spec.verification.sketch_size, seed=spec.training.seed)
        self.status = status or NodeStatus(run_id=spec.run_id, node_id=session.node_id)
        self.on_status = on_status or (lambda status: None)
        self.stop = stop or threading.Event()
        self.records: dict[int, list[MicroBatchRecord]] = {}  # round -> records, for audits
        self.segments_dir = segments_dir
        if segments_dir is not None:
            RoundStates.clean(segments_dir)  # states a killed node left behind

    # ---------------------------------------------------------------- work

    def _get_work(self, round_number: int) -> pb.WorkAssignment:
        """The assignment of ``round_number``; while the run is paused (or not started), asks again every
        :data:`PAUSED_POLL` seconds (an empty assignment if the node is stopped meanwhile)."""
        while not self.stop.is_set():
            try:
                assignment = self.client.get_work(round_number)
            except grpc.RpcError as e:
                refusal = refusal_of(e)
                if refusal in (pb.REFUSAL_RUN_STOPPED, pb.REFUSAL_RUN_ENDED):  # ended: past training.max_rounds
                    raise RunStopped() from e
                if refusal == pb.REFUSAL_RUN_NOT_RUNNING:
                    self.set_state("paused")
                    self.stop.wait(PAUSED_POLL)
                    continue
                if e.code() in REFUSED_CODES:
                    raise self.session.error(e) from e  # e.g. banned after failed audits: exit 5
                raise
            if assignment.run_state == pb.RUN_STATE_STOPPED:
                raise RunStopped()
            return assignment
        return pb.WorkAssignment(round=round_number)

    def _await_witnessed(self, round_number: int, assignment: pb.WorkAssignment) -> pb.WorkAssignment:
        """This peer loaded θ from a peer, and the coordinator has not published the round's hash yet: ask again for
        up to two matchmaking times, so that a θ served by a forger is refused before it is trained from. The witness
        publishes the hash as its all-reduce of the previous round ends, the one the peers served from ended too.
        When it missed that round it holds this one unconfirmed and publishes none: the run's round (the witness's)
        has reached this one without a hash, and the wait ends (seen, waiting without that check: 4-20 s of a
        joiner's round, in short test rounds the whole round). An unwitnessed run publishes none."""
        if not self.spec.witnessed:
            return assignment
        deadline = time.monotonic() + 2 * self.spec.averaging.matchmaking_time
        while not assignment.state_hash and time.monotonic() < deadline:
            if self.client.get_run_status().summary.round >= round_number:
                return self._get_work(round_number)  # published meanwhile, or never
            if self.stop.wait(WITNESSED_POLL):
                break
            assignment = self._get_work(round_number)
        if not assignment.state_hash and not self.stop.is_set():
            logger.warning("round %d: the coordinator published no θ hash for the state loaded from a peer; training "
                           "from it unchecked", round_number)
        return assignment

    def set_state(self, state: str) -> None:
        if self.status.state != state:
            logger.info("state: %s", state)
        self.status.state = state
        self.on_status(self.status)

    def train_round(self) -> None:
        """Inner steps on this round's micro-batches until the swarm closes the round; average; report.

        The round starts from θ_r, which every honest peer holds bitwise; each micro-batch is one inner AdamW step,
        so its record (loss, gradient sketch) is computed at the parameters of that step. The contribution commits
        to the records, to θ_r (``params_hash``), to the parameters after the last inner step (``end_params_hash``),
        to the sketch of the pseudo-gradient sent (``delta_sketch``) and to the hash of its training state
        (parameters + inner optimizer state, :mod:`omi.models.segments`) at the start, after every
        ``verification.segment_steps`` inner steps and at the end (``segment_hashes``), the states a segment audit
        replays from.
        """
        for attempt in range(STATE_CHECKS):
            round_number = self.optimizer.begin_round()
            assignment = self._get_work(round_number)
            if not assignment.state_hash and getattr(self.optimizer, "holds_served_state", False):
                assignment = self._await_witnessed(round_number, assignment)
            if self.stop.is_set():
                return
            # a late joiner refuses a θ the witness did not see; if the swarm moved on meanwhile, it catches up and
            # checks that round's θ (after STATE_CHECKS tries it trains from what it holds, and says so)
            if not assignment.state_hash or not hasattr(self.optimizer, "check_state") \
                    or self.optimizer.check_state(assignment.state_hash):  # (the lock-step harness has no check)
                break
            if attempt == STATE_CHECKS - 1:
                logger.error("round %d: no peer served the witnessed θ in %d tries; training from this peer's own",
                             round_number, STATE_CHECKS)
        self.set_state("training")
        self.status.round = round_number
        segments = RoundStates(self.segments_dir)  # the training state at step 0, k, 2k, ..., the end
        try:
            self._train_round(round_number, assignment, segments)
        finally:
            segments.discard()  # what an audit needs was handed to the params server

    def _train_round(self, round_number: int, assignment: pb.WorkAssignment, segments: RoundStates) -> None:
        opt, training = self.optimizer, self.spec.training
        started_hash = params_hash(self.model)
        steps_per_segment = segment_steps(self.spec)
        segments.add(training_state(self.model, opt.inner))
        records: list[MicroBatchRecord] = []
        compute_seconds, started = 0.0, time.perf_counter()
        order = assignment_indices(assignment)  # empty when every shard of the round is taken
        whole = itertools.islice(micro_batches(order, self.micro_batch_size), len(order) // self.micro_batch_size)
        for index, indices in enumerate(whole):  # the assignment once, never wrapped around
            if self.stop.is_set():
                return  # Ctrl-C mid-round: the round's partial work is not reported
            if opt.round_closed():
                break
            seed = micro_batch_seed(training.seed, self.spec.run_id, round_number, self.status.node_id, index)
            tick = time.perf_counter()
            opt.zero_grad()
            record = self._micro_batch(round_number, index, indices, seed)
            self._before_averaging(round_number, index)
            opt.inner_step(len(indices))
            compute_seconds += time.perf_counter() - tick
            records.append(record)
            if len(records) % steps_per_segment == 0:
                segments.add(training_state(self.model, opt.inner))
            self._update_status(records, started)
        else:
            opt.wait_for_round_end(self.stop)
        if self.stop.is_set():
            return
        if len(records) % steps_per_segment:
            segments.add(training_state(self.model, opt.inner))
        end_hash = params_hash(self.model)
        result = opt.end_round()
        self.status.last_group_size = result.group_size
        self.status.utilization = compute_seconds / max(time.perf_counter() - started, 1e-9)
        if not records:
            logger.info("round %d closed before this node computed a micro-batch", round_number)
            return
        self._report(round_number, assignment, started_hash, end_hash, records, compute_seconds, result, segments)

    # ---------------------------------------------------------------- what is computed, sent and committed

    def _micro_batch(self, round_number: int, index: int, indices: list[int], seed: int) -> MicroBatchRecord:
        """Compute one assigned micro-batch: its gradient lands in ``param.grad``, its record is returned."""
        return compute_micro_batch(self.model, self.scheduler, self.source.get(indices), seed,
                                   prediction_type=self.spec.training.prediction_type, sketch=self.sketch,
                                   index=index)

    def _before_averaging(self, round_number: int, index: int) -> None:
        """Last look at ``param.grad`` before the inner step uses it (honest: untouched)."""

    def _commit(self, round_number: int, records: list[MicroBatchRecord]) -> list[MicroBatchRecord]:
        """The records this node commits to (Merkle root, sketch, samples) and hands over when audited."""
        return records

    def _hand_over(self, round_number: int, task_id: str) -> None:
        """The coordinator audits ``round_number``: send every committed record of it (the Merkle leaves, in order)."""
        records = self.records.get(round_number)
        if records is None:
            logger.warning("round %d is audited but its records are gone", round_number)
            return
        try:
            reply = self.client.submit_audit_records(task_id, [record_to_proto(r) for r in records])
        except grpc.RpcError as e:
            logger.warning("round %d: audit records refused: %s %s", round_number, e.code().name, e.details())
            return
        if not reply.accepted:
            logger.error("round %d: the coordinator says our records contradict our contribution: %s", round_number,
                         reply.reason)

    def _hold_segments(self, round_number: int, segments: RoundStates) -> None:
        """The coordinator audits ``round_number``: keep its training states for the validator, which replays one
        segment from its start state."""
        segments.hand_over(self.params_server)

    def _update_status(self, records: list[MicroBatchRecord], started: float) -> None:
        status, progress = self.status, self.optimizer.tracker.global_progress
        elapsed = max(time.perf_counter() - started, 1e-9)
        status.samples += records[-1].samples
        status.loss = sum(record.loss for record in records[-8:]) / len(records[-8:])
        status.local_samples_per_second = sum(record.samples for record in records) / elapsed
        status.peers = progress.num_peers
        if progress.epoch == status.round:  # what the swarm's progress records say it trained in this round so far
            status.swarm_samples_per_second = progress.samples_accumulated / elapsed
        self.on_status(status)

    def _report(self, round_number: int, assignment: pb.WorkAssignment, started_hash: bytes, end_hash: bytes,
                records: list[MicroBatchRecord], compute_seconds: float, result: RoundResult,
                segments: RoundStates) -> None:
        records = self._commit(round_number, records)
        if not records:  # no data this round (every shard was taken): nothing to report
            return
        samples = sum(record.samples for record in records)
        contribution = pb.Contribution(
            round=round_number, assignment_id=assignment.assignment_id, samples=samples,
            mean_loss=sum(record.loss * record.samples for record in records) / samples,
            compute_seconds=compute_seconds, params_hash=started_hash, commitment=merkle_root(records),
            micro_batches=len(records), gradient_sketch=sent_sketch(records).tolist(),
            segment_hashes=segments.hashes, end_params_hash=end_hash, bytes_sent=result.bytes_sent,
            delta_sketch=self.sketch.of_grads(result.delta, result.delta).tolist(),
        )
        self.records[round_number] = records
        kept = max(RECORDS_KEPT_ROUNDS, self.spec.verification.audit_window_rounds + 1)
        for old in [r for r in self.records if r <= round_number - kept]:
            del self.records[old]
        try:
            reply = self.client.report_contribution(contribution)
        except grpc.RpcError as e:
            logger.warning("round %d: contribution refused: %s %s", round_number, e.code().name, e.details())
            return
        if reply.accepted:
            self.status.contributions += 1
        if reply.audit_task_id:
            self._hold_segments(round_number, segments)
            self._hand_over(round_number, reply.audit_task_id)
        logger.info("round %d: reported %d samples in %d inner steps, loss %.4f, %.1f s of compute, %.1f s of sync, "
                    "%d bytes sent (averaged with %d peers)", round_number, samples, len(records),
                    contribution.mean_loss, compute_seconds, result.sync_seconds, result.bytes_sent,
                    result.group_size)
