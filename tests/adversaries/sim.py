"""A lock-step swarm of DiLoCo rounds in one process: real nodes (and adversaries), real coordinator, real validator.

What is real: every node is an ``omi.node.trainer.Trainer`` (or an adversary subclass) registered over gRPC
with a real coordinator (``ServerThread``); it gets its ``WorkAssignment``, runs its own ``train_round`` — inner
steps through ``compute_micro_batch``, ``_report`` with the Merkle commitment, the training-state hashes of its
segments and the sketch of its pseudo-gradient, the hand-over of records and states when audited — and the
validator's segment audit (``omi.node.recompute.Recomputer.check_segment``) takes ``AuditTask``s over gRPC and
reports signed verdicts. What is simulated: hivemind. :class:`LockstepRoundOptimizer` stands in for
``omi.swarm.RoundOptimizer``: each node takes its inner AdamW steps, then :class:`LockstepSwarm` reduces the
nodes' pseudo-gradients (``mean`` or :func:`omi.swarm.centered_clip`, weighted by samples as the real all-reduce
does) and takes the outer step on one shared copy of the parameters, which every node then holds bitwise (the ideal
all-reduce). A banned node gets PERMISSION_DENIED from the coordinator and leaves the swarm (peers refuse it once its
token expires; that refusal is tested with real peers in test_swarm_access.py / test_verification_swarm.py).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import grpc
import torch
from omi.models import GradientSketch, build_for_spec, model_info, open_source
from omi.models.microbatch import compute_micro_batch, flatten_grads, trainable_parameters
from omi.models.optimizer import optimizer_for
from omi.models.segments import held_states
from omi.node.client import CoordinatorClient
from omi.node.parameter_history import ParameterHistory
from omi.node.recompute import Recomputer
from omi.node.session import NodeError, NodeSession
from omi.node.trainer import Trainer
from omi.protos import pb
from omi.protos.peer_ids import new_identity
from omi.protos.signing import generate_key
from omi.swarm import ParamsRefused, ParamsServer, ParamsUnavailable, RoundResult, centered_clip

logger = logging.getLogger(__name__)

SIM_RUN = """
[run]
id = "sim"
model = "unet-digits-16"
[training]
micro_batch_size = {micro_batch_size}
learning_rate = {learning_rate}
shards_per_assignment = 1
[averaging]
reducer = "{reducer}"
clip_tau = {clip_tau}
clip_iterations = 5
[verification]
audit_rate = {audit_rate}
max_strikes = {max_strikes}
audit_window_rounds = {audit_window}
sketch_size = 256
segment_steps = {segment_steps}
[rounds]
inner_steps = {inner_steps}
outer_learning_rate = 1.0
outer_momentum = 0.0
outer_nesterov = false
"""


def sim_run_toml(*, micro_batch_size: int = 8, learning_rate: float = 2e-3, reducer: str = "mean",
                 clip_tau: float = 1.0, audit_rate: float = 0.2, max_strikes: int = 2, audit_window: int = 2,
                 inner_steps: int = 4, segment_steps: int = 2) -> str:
    """The lock-step run: DiLoCo rounds of ``inner_steps`` inner steps (plain outer SGD at lr 1, so
    θ_{r+1} = θ_r − the reduced pseudo-gradient), audited by segments of ``segment_steps``. The defaults keep a
    round short (4 inner steps, two segments) and still give every segment audit a start state that is not θ_r."""
    return SIM_RUN.format(micro_batch_size=micro_batch_size, learning_rate=learning_rate, reducer=reducer,
                          clip_tau=clip_tau, audit_rate=audit_rate, max_strikes=max_strikes,
                          audit_window=audit_window, inner_steps=inner_steps, segment_steps=segment_steps)


class LockstepRoundOptimizer:
    """What the trainer uses of ``omi.swarm.RoundOptimizer``, for one node of a :class:`LockstepSwarm`: inner
    AdamW steps on the node's model (its state kept across rounds, as the real one does) until ``inner_steps``;
    ``end_round`` sends the pseudo-gradient θ_r − θ_local to the swarm, which reduces them all and applies the outer
    step once every node has trained (the ideal all-reduce: every peer holds θ_{r+1} bitwise)."""

    def __init__(self, swarm: LockstepSwarm, model: torch.nn.Module):
        self.swarm, self.model = swarm, model
        self.params = trainable_parameters(model)
        self.inner = optimizer_for(swarm.spec.training)(self.params)
        self.round = swarm.round
        # no swarm progress records here: the trainer's status shows no peers and no swarm throughput
        self.tracker = SimpleNamespace(global_progress=SimpleNamespace(num_peers=0, epoch=-1, samples_accumulated=0))
        self._steps = self._samples = 0

    def begin_round(self) -> int:
        self.round, self._steps, self._samples = self.swarm.round, 0, 0
        return self.round

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=True)

    def inner_step(self, batch_size: int) -> None:
        self.inner.step()
        self._steps += 1
        self._samples += batch_size

    def round_closed(self) -> bool:
        return self._steps >= self.swarm.spec.rounds.inner_steps

    def wait_for_round_end(self, stop) -> None:
        pass

    def end_round(self) -> RoundResult:
        theta = trainable_parameters(self.swarm.model)
        delta = [start.detach() - p.detach() for start, p in zip(theta, self.params, strict=True)]
        self.swarm.submit(flatten_grads(delta, self.params), self._samples)
        return RoundResult(round=self.round, samples=self._samples, inner_steps=self._steps,
                           group_size=len(self.swarm.nodes), applied=True, bytes_sent=0, sync_seconds=0.0,
                           delta=delta)

    def shutdown(self) -> None:
        pass


@dataclass
class SimResult:
    rounds: int
    losses: list[float]  # evaluation loss of the shared parameters after each round
    banned: dict[str, int] = field(default_factory=dict)  # node name -> contributions it reported before its ban
    contributions: dict[str, int] = field(default_factory=dict)  # node name -> contributions reported
    verdicts: list[pb.AuditVerdict] = field(default_factory=list)
    train_seconds: float = 0.0  # node compute (rounds of inner steps)
    verify_seconds: float = 0.0  # validator compute (segment replays)


class InProcessFetcher:
    """The validator's ``ParamsFetcher`` of a lock-step swarm: reads the audited node's ``ParamsServer``."""

    def __init__(self, swarm: LockstepSwarm):
        self.swarm = swarm

    def fetch(self, peer_id: str, digest: bytes, max_bytes: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        for node in self.swarm.nodes.values():
            if node.session.peer_id == peer_id:
                held = node.params_server.get(digest)
                if held is None:
                    raise ParamsRefused("parameters not held")
                return load(held)
        raise ParamsUnavailable("no such peer in the swarm")


class LockstepSwarm:
    """Nodes of several classes training one model in lock-step rounds against a real coordinator.

    :param server: a started ``ServerThread`` whose run is ``spec_toml``'s
    :param spec: the run's RunSpec (as nodes receive it)
    :param node_classes: name -> Trainer subclass, one node each
    :param workdir: state dirs of the nodes
    """

    def __init__(self, server, spec: pb.RunSpec, node_classes: dict[str, type[Trainer]], workdir: Path):
        assert spec.rounds.inner_steps > 0, "the lock-step swarm trains rounds ([rounds] inner_steps > 0)"
        self.server, self.spec = server, spec
        self.fetcher = InProcessFetcher(self)
        training = spec.training
        self.model, self.scheduler = build_for_spec(spec)
        # the outer step: θ_{r+1} = θ_r − lr × the reduced pseudo-gradient
        self.opt = torch.optim.SGD(self.model.parameters(), lr=spec.rounds.outer_learning_rate)
        self.source = open_source(spec.data, channels=model_info(spec.model).channels)
        self.round = 0
        self.nodes: dict[str, Trainer] = {}
        self._sent: list[tuple[torch.Tensor, int]] = []
        for name, cls in node_classes.items():
            session = NodeSession(server.address, workdir / name, connect_attempts=1)
            node_spec = session.open(display_name=name)
            model = copy.deepcopy(self.model)
            self.nodes[name] = cls(session, node_spec, model=model, scheduler=self.scheduler, source=self.source,
                                   optimizer=LockstepRoundOptimizer(self, model),
                                   micro_batch_size=training.micro_batch_size,
                                   params_server=ParamsServer(dht=None, access=None, keep=held_states(spec)))
        self.validator = CoordinatorClient(server.address, generate_key(), attempts=1)
        self.validator.register(spec.run_id, new_identity(), display_name="validator")
        server.coordinator.auditor.grant(self.validator.node_id, "the lock-step swarm's validator")
        server.coordinator.auditor.trust(self.validator.node_id)  # it plays the coordinator's built-in validator
        self.recomputer = Recomputer(spec, copy.deepcopy(self.model), self.scheduler, self.source,
                                     GradientSketch(self.model, spec.verification.sketch_size, seed=training.seed))
        # the validator's own θ_r of each round (what its follower would hold): the shared parameters, bitwise
        self.history = ParameterHistory(spec.verification.audit_window_rounds + 2)
        self.eval_batches = [(self.source.get(list(range(i, 1797, 29))[:32]), 1000 + i) for i in range(4)]
        self.result = SimResult(rounds=0, losses=[])

    def submit(self, sent: torch.Tensor, samples: int) -> None:
        self._sent.append((sent, samples))

    def _apply(self) -> None:
        """The swarm's outer step: reduce the pseudo-gradients sent (weighted by samples) and step."""
        if not self._sent:
            return
        vectors = torch.stack([v for v, _ in self._sent])
        weights = torch.tensor([float(s) for _, s in self._sent])
        if self.spec.averaging.reducer == "centered_clip":
            averaged = centered_clip(vectors, weights, tau=self.spec.averaging.clip_tau,
                                     iterations=self.spec.averaging.clip_iterations)
        else:
            averaged = (vectors * weights[:, None]).sum(0) / weights.sum()
        self._sent.clear()
        offset = 0
        for param in self.model.parameters():
            param.grad = averaged[offset:offset + param.numel()].view_as(param).clone()
            offset += param.numel()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for node in self.nodes.values():  # every peer now holds the swarm's parameters (bitwise, ideally)
                for mine, shared in zip(node.model.parameters(), self.model.parameters(), strict=True):
                    mine.copy_(shared)

    def eval_loss(self) -> float:
        total = 0.0
        for batch, seed in self.eval_batches:
            record = compute_micro_batch(self.model, self.scheduler, batch, seed,
                                         prediction_type=self.spec.training.prediction_type, sketch=None)
            total += record.loss
        self.model.zero_grad(set_to_none=True)
        return total / len(self.eval_batches)

    def validate_all(self) -> None:
        """The validator drains the coordinator's queue (real gRPC, real segment replays, signed verdicts)."""
        while True:
            task = self._paced(self.validator.get_audit_task)
            if not task.has_task:
                return
            tick = time.perf_counter()
            verdict = self.recomputer.check_segment(task, self.history, self.fetcher)
            self.result.verify_seconds += time.perf_counter() - tick
            assert verdict is not None, f"no verdict on round {task.round} of node {task.node_id[:12]}"
            self._paced(lambda: self.validator.report_audit_verdict(verdict))  # noqa: B023 (called at once)
            self.result.verdicts.append(verdict)

    @staticmethod
    def _paced(call, attempts: int = 30):
        """``call()``, waiting a second whenever the coordinator's per-node rate limit says slow down."""
        for attempt in range(attempts):
            try:
                return call()
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == attempts - 1:
                    raise
                time.sleep(1.0)

    def run(self, rounds: int) -> SimResult:
        result = self.result
        for _ in range(rounds):
            self.history.add(self.round, self.model)
            for name, node in list(self.nodes.items()):
                before = node.status.contributions
                tick = time.perf_counter()
                try:
                    node.train_round()
                except (grpc.RpcError, NodeError) as e:  # GetWork of a banned node: NodeError, exit code 5
                    if node.session.refused is None and (not isinstance(e, grpc.RpcError)
                                                 or e.code() != grpc.StatusCode.PERMISSION_DENIED):
                        raise
                    result.banned[name] = result.contributions.get(name, 0)
                    del self.nodes[name]  # banned: no work, no token renewal, out of the swarm
                    continue
                result.train_seconds += time.perf_counter() - tick
                result.contributions[name] = result.contributions.get(name, 0) + (node.status.contributions - before)
            self._apply()
            self.round += 1
            self.server.coordinator.runs.advance(self.spec.run_id, self.round)  # as the coordinator's witness does
            self.validate_all()
            result.losses.append(self.eval_loss())
            result.rounds = self.round
        return result

    def close(self) -> None:
        for node in self.nodes.values():
            node.session.close()
        self.validator.close()
