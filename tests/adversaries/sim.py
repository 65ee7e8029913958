"""A lock-step swarm in one process: real nodes (and adversaries), real coordinator, real validator code.

What is real: every node is an ``omi.node.trainer.Trainer`` (or an adversary subclass) registered over gRPC
with a real coordinator (``ServerThread``); it gets its ``WorkAssignment``, runs its own ``train_epoch`` —
micro-batches through ``compute_micro_batch``, ``_report`` with the Merkle commitment and sketch, the records
hand-over when audited — and the validator (``omi.node.validator.Recomputer``) takes ``AuditTask``s over gRPC and
reports signed verdicts. What is simulated: hivemind. :class:`LockstepOptimizer` stands in for
``hivemind.Optimizer``: each node steps ``micro_batches`` times per epoch, then :class:`LockstepSwarm` reduces what
the nodes sent (``mean`` or :func:`omi.swarm.centered_clip`, weighted by samples as hivemind does) and applies
AdamW to one shared copy of the parameters, which every node then holds bitwise (the ideal swarm); in round mode
(``[rounds] inner_steps > 0``) :class:`LockstepRoundOptimizer` stands in for ``RoundOptimizer`` and the swarm
reduces the nodes' pseudo-gradients and takes the outer step instead. A banned node
gets PERMISSION_DENIED from the coordinator and leaves the swarm (peers refuse it once its token expires; that
refusal is tested with real peers in test_swarm_access.py / test_verification_swarm.py).
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
from omi.node.session import NodeError, NodeSession
from omi.node.trainer import Trainer
from omi.node.validator import ParameterHistory, Recomputer
from omi.protos import pb
from omi.protos.peer_ids import new_identity
from omi.protos.signing import generate_key
from omi.swarm import centered_clip
from omi.swarm.params_p2p import ParamsRefused, ParamsServer, ParamsUnavailable
from omi.swarm.rounds import RoundResult

logger = logging.getLogger(__name__)

SIM_RUN = """
[run]
id = "sim"
model = "unet-digits-16"
[training]
micro_batch_size = {micro_batch_size}
target_batch_size = 64
learning_rate = {learning_rate}
shards_per_assignment = 1
[averaging]
reducer = "{reducer}"
clip_tau = {clip_tau}
clip_iterations = 5
[verification]
audit_rate = {audit_rate}
micro_batches_per_audit = {micro_batches_per_audit}
max_strikes = {max_strikes}
audit_window_epochs = {audit_window}
sketch_size = 256
segment_steps = {segment_steps}
[rounds]
inner_steps = {inner_steps}
outer_learning_rate = 1.0
outer_momentum = 0.0
outer_nesterov = false
"""


def sim_run_toml(*, micro_batch_size: int = 8, learning_rate: float = 2e-3, reducer: str = "mean",
                 clip_tau: float = 1.0, audit_rate: float = 0.2, micro_batches_per_audit: int = 2,
                 max_strikes: int = 2, audit_window: int = 2, inner_steps: int = 0, segment_steps: int = 2) -> str:
    """The lock-step run; ``inner_steps > 0``: DiLoCo rounds of that many inner steps (plain outer SGD at lr 1, so
    θ_{r+1} = θ_r − the reduced pseudo-gradient), audited by segments of ``segment_steps``."""
    return SIM_RUN.format(micro_batch_size=micro_batch_size, learning_rate=learning_rate, reducer=reducer,
                          clip_tau=clip_tau, audit_rate=audit_rate, micro_batches_per_audit=micro_batches_per_audit,
                          max_strikes=max_strikes, audit_window=audit_window, inner_steps=inner_steps,
                          segment_steps=segment_steps)


class LockstepOptimizer:
    """What the trainer uses of ``hivemind.Optimizer``, for one node of a :class:`LockstepSwarm`.

    Like hivemind's GradientAverager it accumulates ``samples_i / samples_0 * grad_i`` over the node's steps and
    sends the sum divided by their number; after ``micro_batches`` steps the node's epoch moves on.
    """

    def __init__(self, swarm: LockstepSwarm, model: torch.nn.Module):
        self.swarm, self.model = swarm, model
        self.local_epoch = swarm.epoch
        self.state_loads = 0
        self.grad_group_size = 0
        self.tracker = SimpleNamespace(global_progress=SimpleNamespace(num_peers=0, target_batch_size=0))
        self._sum: torch.Tensor | None = None
        self._steps, self._anchor, self._samples = 0, 0, 0

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def step(self, batch_size: int) -> None:
        params = trainable_parameters(self.model)
        flat = flatten_grads([p.grad for p in params], params)
        if self._steps == 0:
            self._anchor, self._sum = batch_size, torch.zeros_like(flat)
        self._sum += flat * (batch_size / self._anchor)
        self._steps += 1
        self._samples += batch_size
        if self._steps == self.swarm.micro_batches:
            self.swarm.submit(self._sum / self._steps, self._samples)
            self._sum, self._steps, self._samples = None, 0, 0
            self.local_epoch += 1
            self.grad_group_size = len(self.swarm.nodes)

    def shutdown(self) -> None:
        pass


class LockstepRoundOptimizer:
    """What the trainer uses of ``omi.swarm.rounds.RoundOptimizer``, for one node of a :class:`LockstepSwarm` in
    round mode: inner AdamW steps on the node's model (its state kept across rounds, as the real one does) until
    ``inner_steps``; ``end_round`` sends the pseudo-gradient θ_r − θ_local to the swarm, which reduces them all and
    applies the outer step once every node has trained (the ideal all-reduce: every peer holds θ_{r+1} bitwise)."""

    def __init__(self, swarm: LockstepSwarm, model: torch.nn.Module):
        self.swarm, self.model = swarm, model
        self.params = trainable_parameters(model)
        self.inner = optimizer_for(swarm.spec.training)(self.params)
        self.round = swarm.epoch
        self.state_loads = 0
        self.grad_group_size = 0
        self.tracker = SimpleNamespace(global_progress=SimpleNamespace(num_peers=0, target_batch_size=0))
        self._steps = self._samples = 0

    @property
    def local_epoch(self) -> int:
        return self.round

    @local_epoch.setter
    def local_epoch(self, value: int) -> None:
        self.round = value

    def begin_round(self) -> int:
        self.round, self._steps, self._samples = self.swarm.epoch, 0, 0
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
        self.grad_group_size = len(self.swarm.nodes)
        return RoundResult(round=self.round, samples=self._samples, inner_steps=self._steps,
                           group_size=self.grad_group_size, applied=True, bytes_sent=0, sync_seconds=0.0,
                           delta=delta)

    def shutdown(self) -> None:
        pass


@dataclass
class SimResult:
    epochs: int
    losses: list[float]  # evaluation loss of the shared parameters after each epoch
    banned: dict[str, int] = field(default_factory=dict)  # node name -> contributions it reported before its ban
    contributions: dict[str, int] = field(default_factory=dict)  # node name -> contributions reported
    verdicts: list[pb.AuditVerdict] = field(default_factory=list)
    train_seconds: float = 0.0  # node compute (micro-batches)
    verify_seconds: float = 0.0  # validator compute (recomputations)


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
    """Nodes of several classes training one model in lock-step against a real coordinator.

    :param server: a started ``ServerThread`` whose run is ``spec_toml``'s
    :param spec: the run's RunSpec (as nodes receive it)
    :param node_classes: name -> Trainer subclass, one node each
    :param workdir: state dirs of the nodes
    :param micro_batches: micro-batches per node per epoch
    :param drift: relative parameter drift of the validator's copy (0: it holds the nodes' exact parameters)
    :param fetch_params: the validator asks audited nodes for their parameters (their ``ParamsServer``, read in
        process here instead of over hivemind's P2P)
    """

    def __init__(self, server, spec: pb.RunSpec, node_classes: dict[str, type[Trainer]], workdir: Path, *,
                 micro_batches: int = 2, drift: float = 0.0, fetch_params: bool = True):
        self.server, self.spec, self.micro_batches, self.drift = server, spec, micro_batches, drift
        self.fetcher = InProcessFetcher(self) if fetch_params else None
        training = spec.training
        self.model, self.scheduler = build_for_spec(spec)
        self.init = [p.detach().clone() for p in self.model.parameters()]
        self.rounds = spec.rounds.inner_steps > 0
        if self.rounds:  # the outer step: θ_{r+1} = θ_r − lr × the reduced pseudo-gradient
            self.opt = torch.optim.SGD(self.model.parameters(), lr=spec.rounds.outer_learning_rate)
        else:  # the swarm's step, as hivemind.Optimizer's
            self.opt = optimizer_for(training)(self.model.parameters())
        self.source = open_source(spec.data, channels=model_info(spec.model).channels)
        self.epoch = 0
        self.nodes: dict[str, Trainer] = {}
        self.names: dict[int, str] = {}
        self._sent: list[tuple[torch.Tensor, int]] = []
        for name, cls in node_classes.items():
            session = NodeSession(server.address, workdir / name, connect_attempts=1)
            node_spec = session.open(display_name=name)
            model = copy.deepcopy(self.model)
            node = cls(session, node_spec, model=model, scheduler=self.scheduler, source=self.source,
                       optimizer=(LockstepRoundOptimizer if self.rounds else LockstepOptimizer)(self, model),
                       micro_batch_size=training.micro_batch_size,
                       params_server=ParamsServer(dht=None, access=None, keep=held_states(spec)))
            self.nodes[name] = node
            self.names[id(node)] = name
        self.validator = CoordinatorClient(server.address, generate_key(), attempts=1)
        self.validator.register(spec.run_id, new_identity(), display_name="validator")
        server.coordinator.auditor.grant(self.validator.node_id, "the lock-step swarm's validator")
        server.coordinator.auditor.trust(self.validator.node_id)  # it plays the coordinator's built-in validator
        self.recomputer = Recomputer(spec, copy.deepcopy(self.model), self.scheduler, self.source,
                                     GradientSketch(self.model, spec.verification.sketch_size, seed=training.seed))
        self.history = ParameterHistory(spec.verification.audit_window_epochs + 2)
        self.eval_batches = [(self.source.get(list(range(i, 1797, 29))[:32]), 1000 + i) for i in range(4)]
        self.result = SimResult(epochs=0, losses=[])

    def submit(self, sent: torch.Tensor, samples: int) -> None:
        self._sent.append((sent, samples))

    def _snapshot(self) -> None:
        """What the validator keeps of this epoch: the exact parameters, or a drifted copy of them."""
        if not self.drift:
            self.history.add(self.epoch, self.model)
            return
        drifted = copy.deepcopy(self.model)
        generator = torch.Generator().manual_seed(self.epoch)
        with torch.no_grad():
            for param, start in zip(drifted.parameters(), self.init, strict=True):
                moved = param - start
                param.add_(moved * self.drift * torch.randn(param.shape, generator=generator))
        self.history.add(self.epoch, drifted)

    def _apply(self) -> None:
        """The swarm's step: reduce what was sent (hivemind weights by samples) and apply AdamW."""
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
        """The validator drains the coordinator's queue (real gRPC, real recomputation, signed verdicts)."""
        while True:
            task = self._paced(self.validator.get_audit_task)
            if not task.has_task:
                return
            tick = time.perf_counter()
            verdict = self.recomputer.check_task(task, self.history, self.fetcher)
            self.result.verify_seconds += time.perf_counter() - tick
            assert verdict is not None, f"no parameters of epoch {task.epoch} in the validator's history"
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

    def run(self, epochs: int) -> SimResult:
        result = self.result
        for _ in range(epochs):
            self._snapshot()
            for name, node in list(self.nodes.items()):
                node.optimizer.local_epoch = self.epoch
                before = node.status.contributions
                tick = time.perf_counter()
                try:
                    node.train_epoch()
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
            self.epoch += 1
            self.server.coordinator.runs.advance(self.spec.run_id, self.epoch)  # as the coordinator's witness does
            self.validate_all()
            result.losses.append(self.eval_loss())
            result.epochs = self.epoch
        return result

    def close(self) -> None:
        for node in self.nodes.values():
            node.session.close()
        self.validator.close()
