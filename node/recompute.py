"""A validator's check of one audited segment: replay it from the node's committed state, compare, give a verdict.

For an ``AuditTask`` — one segment of ``verification.segment_steps`` inner steps of a contribution's round —
:meth:`Recomputer.check_segment`

1. checks every handed-over record's Merkle proof against the contribution's commitment;
2. fetches the segment's start training state (parameters and inner AdamW state) from the node itself over
   hivemind's P2P (:mod:`omi.swarm.params_p2p`); it must hash to the committed segment hash, and the first
   segment's parameters to the contribution's θ_r;
3. replays the segment's inner steps (:func:`omi.models.segments.replay_segment`) on the node's samples (its
   ``WorkAssignment``) and seeds (``micro_batch_seed``), compares every record with :data:`EXACT_TOLERANCES` and
   the end state with the committed one (bitwise, or within :data:`SEGMENT_DISTANCE_STEPS`);
4. checks that the committed sketch of the pseudo-gradient is θ_r − the round's committed end state;
5. signs an ``AuditVerdict`` with the measured differences.

Calibration: ``python -m bench.bench_audit_cost`` and docs/verification.md.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from omi.models import (
    GradientSketch,
    build_for_spec,
    micro_batch_samples,
    micro_batch_seed,
    model_info,
    open_source,
    params_hash,
    place_model,
    proof_of,
    record_from_proto,
)
from omi.models.commitment import verify_proof
from omi.models.microbatch import named_tensors_hash
from omi.models.optimizer import optimizer_for
from omi.models.replay import Tolerances, compare
from omi.models.segments import (
    SegmentStep,
    load_training_state,
    replay_segment,
    segment_steps,
    training_state,
    training_state_hash,
)
from omi.node.parameter_history import ParameterHistory, Snapshot
from omi.protos import pb
from omi.swarm.params_p2p import ParamsFetcher, ParamsRefused, ParamsUnavailable

logger = logging.getLogger(__name__)

# The validator replays from the node's very training state (its hash matches): only float reduction order differs
# (threads, CPU vs CPU); models.replay's defaults sit ~100x above that and below every dishonest figure.
EXACT_TOLERANCES = Tolerances()
# A replayed segment that does not end bitwise at the committed state (another device or thread count) may lie
# this far from it, in optimizer steps: float reordering moves it by orders of magnitude less, one skipped or
# altered inner step by about one.
SEGMENT_DISTANCE_STEPS = 0.1
# The committed sketch of Δ against the sketch of θ_r − the committed end state: both are computed from the same
# float32 tensors on the CPU, so they agree bitwise; the tolerance only absorbs summation order
DELTA_SKETCH_TOLERANCE = 1e-4


@dataclass
class Recomputer:
    """What replaying a run's segments needs: its model, scheduler, data, sketch and seeds."""

    spec: pb.RunSpec
    model: torch.nn.Module
    scheduler: object
    source: object
    sketch: GradientSketch
    exact: Tolerances = EXACT_TOLERANCES

    @classmethod
    def for_spec(cls, spec: pb.RunSpec, device: str = "cpu") -> Recomputer:
        model, scheduler = build_for_spec(spec)
        place_model(model, device)
        source = open_source(spec.data, channels=model_info(spec.model).channels)
        return cls(spec, model, scheduler, source, GradientSketch(model, spec.verification.sketch_size,
                                                                  seed=spec.training.seed))

    def step_length(self) -> float:
        """The most one AdamW step moves the parameters (L2): learning_rate * sqrt(number of parameters)."""
        count = sum(p.numel() for p in self.model.parameters())
        return max(self.spec.training.learning_rate, 1e-12) * math.sqrt(count)

    @staticmethod
    def _records_failure(task: pb.AuditTask) -> pb.AuditVerdict | None:
        """A failed verdict if the handed-over records are not exactly the asked ones under the commitment."""
        if len(task.records) != len(task.micro_batch_indices):
            return pb.AuditVerdict(task_id=task.task_id, passed=False, reason="records of the task are missing")
        for audited in task.records:
            record = record_from_proto(audited.record)
            if record.index not in task.micro_batch_indices or audited.leaves != task.micro_batches:
                return pb.AuditVerdict(task_id=task.task_id, passed=False,
                                       reason=f"record {record.index} was not asked for")
            if not verify_proof(task.commitment, record, proof_of(audited)):
                return pb.AuditVerdict(task_id=task.task_id, passed=False,
                                       reason=f"record {record.index} is not under the commitment")
        return None

    def check_segment(self, task: pb.AuditTask, history: ParameterHistory,
                      fetcher: ParamsFetcher | None) -> pb.AuditVerdict | None:
        """The verdict on a round's segment: fetch its start training state from the node (hash-checked), replay
        its inner steps (:func:`omi.models.segments.replay_segment`), compare every record and the end state.

        None (no verdict) when the node cannot be reached, or when the validator's own θ_r of the round differs
        from the one the node committed to (a peer out of sync is not a cheat by itself)."""
        started = time.perf_counter()
        failure = self._records_failure(task)
        if failure is not None:
            return failure
        k, indices = segment_steps(self.spec), sorted(task.micro_batch_indices)
        segment = indices[0] // k if indices else 0
        if not indices or indices != list(range(segment * k, min((segment + 1) * k, task.micro_batches))) or \
                segment + 1 >= len(task.segment_hashes):
            return pb.AuditVerdict(task_id=task.task_id, passed=False, reason="the task is not a committed segment")
        start_hash, end_hash = task.segment_hashes[segment], task.segment_hashes[segment + 1]

        def fail(reason: str, **fields) -> pb.AuditVerdict:
            return pb.AuditVerdict(task_id=task.task_id, passed=False, reason=reason, params_from_node=True,
                                   recompute_seconds=time.perf_counter() - started, **fields)

        if fetcher is None or not task.peer_id:
            return None
        max_bytes = 4 * model_info(self.spec.model).bytes + (1 << 20)  # parameters and two moments
        try:
            start = fetcher.fetch(task.peer_id, start_hash, max_bytes=max_bytes)
        except ParamsUnavailable as e:
            logger.warning("task %s: could not fetch the segment's start state (%s)", task.task_id[:8], e)
            return None
        except ParamsRefused as e:
            return fail(f"the node did not hand over the start state of segment {segment} ({e})")
        if training_state_hash(start) != start_hash:
            return fail(f"the state the node served does not hash to segment {segment}'s committed start")
        optimizer = optimizer_for(self.spec.training)(self.model.parameters())
        try:
            load_training_state(self.model, optimizer, start)
        except ValueError as e:
            return fail(f"segment {segment}'s start state does not fit the run's model ({e})")
        theta = params_hash(self.model)
        if segment == 0 and theta != task.params_hash:
            return fail("the round's first segment does not start at the parameters the contribution names (θ_r)",
                        params_hash=theta)
        own, exact = history.find(task.params_hash, task.round)
        if segment == 0 and own is not None and not exact:
            logger.warning("task %s: the node's θ_r of round %d is not this validator's; no verdict",
                           task.task_id[:8], task.round)
            return None
        training = self.spec.training
        claimed = {r.index: r for r in (record_from_proto(a.record) for a in task.records)}
        steps = [SegmentStep(index=i, samples=micro_batch_samples(task.assignment, i, max(claimed[i].samples, 1)),
                             seed=micro_batch_seed(training.seed, self.spec.run_id, task.round, task.node_id, i))
                 for i in indices]
        replayed = replay_segment(self.model, optimizer, self.scheduler, self.source, steps,
                                  prediction_type=training.prediction_type, sketch=self.sketch)
        checks = [compare(claimed[r.index], r, self.exact) for r in replayed]
        worst = max(checks, key=lambda c: c.sketch_diff if math.isfinite(c.sketch_diff) else math.inf)
        fields = dict(checks=[c.to_proto() for c in checks], params_hash=theta, exact_params=True)
        if not all(c.passed for c in checks):
            return fail(f"inner step {worst.index} differs: loss {worst.loss_diff:.2e}, norm {worst.norm_diff:.2e}, "
                        f"sketch {worst.sketch_diff:.2e}", **fields)
        distance = 0.0
        end_params = {n: p.detach().cpu() for n, p in self.model.named_parameters()}  # the replayed end...
        if training_state_hash(training_state(self.model, optimizer)) != end_hash:
            # bitwise only on the node's device and thread count: elsewhere measure how far the end states lie
            try:
                end = fetcher.fetch(task.peer_id, end_hash, max_bytes=max_bytes)
            except (ParamsUnavailable, ParamsRefused) as e:
                return fail(f"segment {segment} does not end at the committed state and the node did not hand "
                            f"that state over ({e})", **fields)
            if training_state_hash(end) != end_hash:
                return fail(f"the state the node served does not hash to segment {segment}'s committed end", **fields)
            distance = math.sqrt(sum(float((end_params[n].double() - end[n].double()).pow(2).sum())
                                     for n in end_params)) / self.step_length()
            end_params = end  # ... unless it is not bitwise the committed one: then the committed one
            if not distance <= SEGMENT_DISTANCE_STEPS:
                return fail(f"segment {segment}'s inner steps end {distance:.3g} optimizer steps from the committed "
                            f"end state (tolerance {SEGMENT_DISTANCE_STEPS:g})", params_distance=distance, **fields)
        if task.delta_sketch:
            reason = self._delta_failure(task, own if exact else None, end_params, segment, fetcher, max_bytes)
            if reason is not None:
                return fail(reason, params_distance=distance, **fields)
        return pb.AuditVerdict(task_id=task.task_id, passed=True, params_from_node=True, params_distance=distance,
                               recompute_seconds=time.perf_counter() - started, **fields)

    def _delta_failure(self, task: pb.AuditTask, theta: Snapshot | None, end: dict[str, torch.Tensor],
                       segment: int, fetcher: ParamsFetcher, max_bytes: int) -> str | None:
        """Why the committed sketch of Δ is not the sketch of θ_r − (the round's committed end state), or None.

        θ_r is this validator's own snapshot when it holds the committed one, else the round's first segment start
        state, fetched from the node (hash-checked; its parameters must hash to θ_r). The end state is the audited
        segment's end when it is the round's last, else fetched by the last committed hash."""
        hashes = task.segment_hashes
        try:
            if theta is None:
                start = fetcher.fetch(task.peer_id, hashes[0], max_bytes=max_bytes)
                if training_state_hash(start) != hashes[0]:
                    return "the state the node served does not hash to the round's committed start"
                theta_params = {n: start[n] for n, _ in self.model.named_parameters() if n in start}
                if named_tensors_hash(theta_params.items()) != task.params_hash:
                    return "the round's committed start state is not the parameters the contribution names (θ_r)"
            else:
                theta_params = theta.state
            if segment + 2 < len(hashes):
                final = fetcher.fetch(task.peer_id, hashes[-1], max_bytes=max_bytes)
                if training_state_hash(final) != hashes[-1]:
                    return "the state the node served does not hash to the round's committed end"
                end = final
        except ParamsUnavailable as e:
            logger.warning("task %s: could not fetch a state for the Δ check (%s)", task.task_id[:8], e)
            return None
        except ParamsRefused as e:
            return f"the node did not hand over a committed state of its round ({e})"
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        try:
            delta = [theta_params[n].detach().cpu().float() - end[n].detach().cpu().float() for n in names]
        except KeyError as e:
            return f"a committed state lacks parameter {e}"
        expected = self.sketch.of_grads(delta, delta)  # as the node sketches what it sent (node/trainer.py)
        claimed = torch.tensor(list(task.delta_sketch), dtype=torch.float32)
        if claimed.shape != expected.shape:
            return f"the pseudo-gradient sketch has {claimed.numel()} numbers, not {expected.numel()}"
        difference = float((claimed - expected).norm() / expected.norm().clamp_min(1e-12))
        if not difference <= DELTA_SKETCH_TOLERANCE:
            return (f"the committed pseudo-gradient is not θ_r − the committed end state (sketch differs by "
                    f"{difference:.2e}, tolerance {DELTA_SKETCH_TOLERANCE:g})")
        return None
