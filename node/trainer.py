"""A volunteer's training loop: register, join the run's swarm, train assigned micro-batches, report contributions.

Run it from the command line (``omi.node.cli`` parses the flags and builds a :class:`NodeConfig`)::

    omi-node join --coordinator 127.0.0.1:50051
    omi-node join --coordinator coord.example.org:50051 --device cuda --state-dir ~/.omi/digits

One epoch of the swarm is one step of ``hivemind.Optimizer``: the swarm accumulates ``target_batch_size``
samples, all-reduces the gradients and steps. Within an epoch the parameters do not change, so every micro-batch
a node computes in epoch E is a pure function of (parameters at E, its samples, its seed) — which is what lets a
validator recompute it later. The node walks through its ``WorkAssignment`` of the epoch micro-batch by
micro-batch until the swarm's epoch moves on, then reports one signed ``Contribution`` for epoch E.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from omi.models import (
    GradientSketch,
    MicroBatchRecord,
    build_model,
    compute_micro_batch,
    merkle_root,
    micro_batch_seed,
    model_info,
    open_source,
    params_hash,
    pick_device,
)
from omi.node.client import CoordinatorClient
from omi.node.identity import NodeIdentity
from omi.protos import pb
from omi.protos.tokens import TokenFile
from omi.swarm.keys import load_or_create_peer_identity, load_or_create_swarm_key, swarm_public_key
from omi.swarm.params_p2p import ParamsServer, snapshot

logger = logging.getLogger(__name__)

PAUSED_POLL = 2.0  # seconds between checks of a paused run
TOKEN_RENEW_FRACTION = 0.5  # renew the access token when this fraction of its lifetime is left
RECORDS_KEPT_EPOCHS = 8  # epochs of micro-batch records kept in memory for audits (at least the audit window)


class NodeError(RuntimeError):
    """A problem the volunteer can fix (wrong address, unknown run, unwritable folder); exit_code says which."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class RunStopped(Exception):
    """The coordinator says the run is over."""


@dataclass
class NodeConfig:
    """Settings of ``omi-node join``; defaults suit a volunteer on a laptop."""

    coordinator: str  # HOST:PORT of the coordinator's gRPC API
    run_id: str = ""  # the run to join ("": the only running one)
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    batch_size: int = 0  # micro-batch size (0: the RunSpec's)
    state_dir: Path = field(default_factory=lambda: Path(os.environ.get("OMI_HOME", Path.home() / ".omi")))
    identity: Path | None = None  # Ed25519 key file (default: state_dir/node_key.pem)
    display_name: str = ""  # shown on the dashboard
    host: str = "127.0.0.1"  # address the swarm peer listens on
    port: int = 0  # TCP port of the swarm peer (0: any free one)
    announce: str | None = None  # address other peers dial (behind NAT with port forwarding)
    client_mode: bool = False  # behind NAT without forwarding: outgoing connections only
    max_epochs: int = 0  # leave after contributing to this many epochs (0: until Ctrl-C or the run stops)
    connect_attempts: int = 6  # tries to reach the coordinator before giving up (backoff doubles from 1 s)
    threads: int = 0  # torch CPU threads (0: torch's default)
    save_dir: Path | None = None  # on leaving, save the model here in diffusers format (with its epoch)


@dataclass
class NodeStatus:
    """What the live view shows; updated by the training loop, read by the view and the heartbeat thread."""

    run_id: str = ""
    node_id: str = ""
    state: str = "starting"
    epoch: int = 0
    local_samples_per_second: float = 0.0
    swarm_samples_per_second: float = 0.0
    peers: int = 0
    loss: float = math.nan
    samples: int = 0  # samples this node trained on since it joined
    contributions: int = 0  # contributions the coordinator accepted
    last_group_size: int = 0  # peers in the last gradient all-reduce
    credited_samples: int = 0


def check_state_dir(path: Path) -> None:
    """Refuse a state dir that cannot be created or written, before anything else touches it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise NodeError(f"state dir {path} is not writable: {e.strerror or e}", exit_code=2) from e


def assignment_indices(assignment: pb.WorkAssignment) -> list[int]:
    """The sample indices of an assignment in a seeded order (every node shuffles its shards differently)."""
    indices = [i for shard in assignment.shards for i in range(shard.start, shard.end)]
    generator = torch.Generator().manual_seed(int(assignment.seed) & (2**63 - 1))
    return [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]


def micro_batches(indices: list[int], size: int) -> Iterator[list[int]]:
    """Consecutive micro-batches of ``size`` samples, wrapping around the assignment if the epoch lasts longer."""
    assert indices, "an assignment has samples"
    position = 0
    while True:
        batch = [indices[(position + k) % len(indices)] for k in range(size)]
        position += size
        yield batch


def sent_sketch(records: list[MicroBatchRecord]) -> torch.Tensor:
    """Sketch of the gradient hivemind's GradientAverager sends for these micro-batches.

    It accumulates ``samples_i / samples_0 * grad_i`` and divides by the number of micro-batches; the sketch is
    linear, so the same combination of the micro-batch sketches is the sketch of what was sent.
    """
    anchor = records[0].samples
    total = sum(record.sketch * (record.samples / anchor) for record in records)
    return total / len(records)


class VolunteerNode:
    """One volunteer: owns its identity, coordinator client, swarm peer, model and training loop.

    :param config: the node's settings
    :param on_status: called with the status after every micro-batch (the live view)

    >>> node = VolunteerNode(NodeConfig(coordinator="127.0.0.1:50051"))  # doctest: +SKIP
    >>> try:
    ...     node.run()
    ... finally:
    ...     node.shutdown()
    """

    def __init__(self, config: NodeConfig, on_status: Callable[[NodeStatus], None] | None = None):
        self.config = config
        self.on_status = on_status or (lambda status: None)
        self.status = NodeStatus()
        self.client: CoordinatorClient | None = None
        self.dht = None
        self.optimizer = None
        self.params_server: ParamsServer | None = None
        self.records: dict[int, list[MicroBatchRecord]] = {}  # epoch -> records, for audits
        self._stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._registered = False
        self.refused: str | None = None  # why the coordinator refused this node, if it did
        self.reinstall_signals: Callable[[], None] | None = None  # set by install_stop_signals
        self._epoch_started: float | None = None  # when the swarm's current epoch began (for swarm samples/s)

    # ---------------------------------------------------------------- set-up

    def _connect(self) -> pb.RegisterResponse:
        """Identity, coordinator, registration; the swarm keys are registered with the token."""
        config = self.config
        check_state_dir(config.state_dir)
        identity = NodeIdentity.load_or_create(config.identity or config.state_dir / "node_key.pem")
        self.status.node_id = identity.node_id
        self.client = CoordinatorClient(config.coordinator, identity.key, attempts=config.connect_attempts)
        try:
            run_id = config.run_id or self._only_running_run()
            self.peer_id = load_or_create_peer_identity(config.state_dir / "p2p.id")
            self.swarm_key = load_or_create_swarm_key(config.state_dir / "swarm_rsa.pem")
            response = self.client.register(run_id, self.peer_id, config.display_name,
                                            swarm_public_key(self.swarm_key))
        except grpc.RpcError as e:
            raise self._coordinator_error(e) from e
        self._registered = True
        self.tokens = TokenFile(config.state_dir / "token.bin")
        self.tokens.write(response.token)
        self.status.run_id = run_id
        logger.info("registered as node %s in run %s (peer %s)", identity.node_id[:12], run_id, self.peer_id)
        return response

    def _coordinator_error(self, e: grpc.RpcError) -> NodeError:
        code = e.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return NodeError(f"cannot reach the coordinator at {self.config.coordinator}: {e.details()}", 3)
        if code == grpc.StatusCode.NOT_FOUND:
            return NodeError(f"the coordinator refused: {e.details()}", 4)
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            return NodeError(f"the coordinator refused this node: {e.details()}", 5)
        return NodeError(f"the coordinator answered {code.name}: {e.details()}", 1)

    def _only_running_run(self) -> str:
        runs = [run for run in self.client.list_runs() if run.state == pb.RUN_STATE_RUNNING]
        if len(runs) != 1:
            names = ", ".join(run.run_id for run in runs) or "none"
            raise NodeError(f"pass --run: the coordinator has {len(runs)} running runs ({names})", 4)
        return runs[0].run_id

    def _build(self, spec: pb.RunSpec) -> None:
        """Model, data, sketch, then the swarm peer and the optimizer (in this, the main thread)."""
        from omi.swarm import make_optimizer, start_dht

        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        training = spec.training
        info = model_info(spec.model)
        self.model, self.scheduler = build_model(spec.model, prediction_type=training.prediction_type,
                                                 num_train_timesteps=training.num_train_timesteps,
                                                 seed=training.seed)
        self.model.to(self.device).train()
        self.source = open_source(spec.data, channels=info.channels)
        self.sketch = GradientSketch(self.model, spec.verification.sketch_size, seed=training.seed)
        self.micro_batch_size = self.config.batch_size or training.micro_batch_size
        logger.info("model %s (%d parameters) on %s; data %s", spec.model, info.parameters, self.device, self.source)
        self.dht = start_dht(spec, self.tokens, swarm_key=self.swarm_key,
                             identity_path=self.config.state_dir / "p2p.id", host=self.config.host,
                             port=self.config.port, client_mode=self.config.client_mode,
                             announce_host=self.config.announce)
        logger.info("joined the swarm as %s, listening on %s", self.peer_id,
                    [str(m) for m in self.dht.get_visible_maddrs()])
        self.optimizer = make_optimizer(self.model, spec, self.dht, batch_size_per_step=self.micro_batch_size,
                                        verbose=logger.isEnabledFor(logging.DEBUG))
        self.params_server = ParamsServer.start(self.dht, spec, keep=spec.verification.audit_window_epochs + 1)
        # resume (issue 5): when no peer holds state as new as the coordinator's latest checkpoint, start from it
        from omi.node.download import resume_from_checkpoint
        resume_from_checkpoint(self.client, spec, self.model, self.optimizer, self.config.state_dir / "checkpoints")

    # ---------------------------------------------------------------- background: heartbeats and token renewal

    def _heartbeat_loop(self, spec: pb.RunSpec) -> None:
        interval = spec.liveness.heartbeat_interval
        while not self._stop.wait(interval):
            try:
                self._renew_token_if_needed()
                reply = self.client.heartbeat(epoch=self.status.epoch,
                                              samples_per_second=self.status.local_samples_per_second,
                                              swarm_peers=self.status.peers,
                                              loss=0.0 if math.isnan(self.status.loss) else self.status.loss)
                self.run_state = reply.run_state
            except grpc.RpcError as e:
                logger.warning("heartbeat failed: %s %s", e.code().name, e.details())

    def _renew_token_if_needed(self) -> None:
        token = self.client.token
        left = token.expires_at_ms / 1000 - time.time()
        if left < TOKEN_RENEW_FRACTION * (token.expires_at_ms - token.issued_at_ms) / 1000:
            try:
                self.tokens.write(self.client.renew_token())
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    # banned: the swarm refuses this node once its token expires, so there is no point going on
                    logger.error("the coordinator refused to renew this node's access token: %s", e.details())
                    self.refused = e.details() or e.code().name
                    self.stop()
                    return
                raise
            logger.info("access token renewed until %s", time.strftime("%H:%M:%S",
                                                                       time.localtime(self.client.token.expires_at_ms
                                                                                      / 1000)))

    # ---------------------------------------------------------------- the loop

    def run(self) -> NodeStatus:
        """Train until Ctrl-C, ``max_epochs`` contributions, or the run stops; returns the final status."""
        try:
            self.device = pick_device(self.config.device)
        except ValueError as e:
            raise NodeError(str(e), exit_code=2) from e
        response = self._connect()
        spec = response.run_spec
        self.spec = spec
        self.run_state = pb.RUN_STATE_RUNNING
        self._build(spec)
        if self.reinstall_signals is not None:
            self.reinstall_signals()  # hivemind's averagers just set SIGINT to "ignore"
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, args=(spec,), daemon=True,
                                                  name="omi-heartbeat")
        self._heartbeat_thread.start()
        try:
            while not self._stop.is_set():
                if self.config.max_epochs and self.status.contributions >= self.config.max_epochs:
                    logger.info("contributed to %d epochs, leaving as asked (--max-epochs)", self.status.contributions)
                    break
                self._train_one_epoch()
        except RunStopped:
            logger.info("run %s was stopped by its coordinator; leaving", spec.run_id)
        return self.status

    def _wait_while_paused(self, assignment: pb.WorkAssignment) -> pb.WorkAssignment:
        while assignment.run_state == pb.RUN_STATE_PAUSED and not self._stop.is_set():
            self._set_state("paused")
            self._stop.wait(PAUSED_POLL)
            assignment = self.client.get_work(assignment.epoch)
        return assignment

    def _get_work(self, epoch: int) -> pb.WorkAssignment:
        try:
            assignment = self.client.get_work(epoch)
            assignment = self._wait_while_paused(assignment)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION and "stopped" in (e.details() or ""):
                raise RunStopped() from e
            if e.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                self.refused = e.details() or e.code().name  # e.g. banned after failed audits: exit 5
                raise self._coordinator_error(e) from e
            raise
        if assignment.run_state == pb.RUN_STATE_STOPPED:
            raise RunStopped()
        return assignment

    def _set_state(self, state: str) -> None:
        if self.status.state != state:
            logger.info("state: %s", state)
        self.status.state = state
        self.on_status(self.status)

    def _train_one_epoch(self) -> None:
        """Micro-batches of this epoch until the swarm steps; then report the contribution."""
        opt, training = self.optimizer, self.spec.training
        epoch = opt.local_epoch
        assignment = self._get_work(epoch)
        if self._stop.is_set():
            return
        self._set_state("training")
        self.status.epoch = epoch
        started_hash, started_params = params_hash(self.model), snapshot(self.model)
        loads_before = opt.state_loads
        records: list[MicroBatchRecord] = []
        compute_seconds, started = 0.0, time.perf_counter()
        for index, indices in enumerate(micro_batches(assignment_indices(assignment), self.micro_batch_size)):
            if self._stop.is_set():
                return  # Ctrl-C mid-epoch: the epoch's partial work is not reported
            seed = micro_batch_seed(training.seed, self.spec.run_id, epoch, self.status.node_id, index)
            tick = time.perf_counter()
            opt.zero_grad()
            record = self._micro_batch(epoch, index, indices, seed)
            compute_seconds += time.perf_counter() - tick
            records.append(record)
            self._before_averaging(epoch, index)
            opt.step(batch_size=len(indices))
            self._update_status(records, compute_seconds, started)
            if opt.local_epoch != epoch:
                break
        if opt.state_loads != loads_before:
            logger.info("epoch %d: this node was behind and loaded the swarm's state; its %d micro-batches of "
                        "epoch %d were not used and are not reported", opt.local_epoch, len(records), epoch)
            return
        self._report(epoch, assignment, started_hash, records, compute_seconds, started_params)

    # ---------------------------------------------------------------- what is computed, sent and committed
    # One method per behaviour the auditor checks; tests/adversaries/ overrides exactly one of them per attack.

    def _micro_batch(self, epoch: int, index: int, indices: list[int], seed: int) -> MicroBatchRecord:
        """Compute one assigned micro-batch: its gradient lands in ``param.grad``, its record is returned."""
        return compute_micro_batch(self.model, self.scheduler, self.source.get(indices), seed,
                                   prediction_type=self.spec.training.prediction_type, sketch=self.sketch,
                                   index=index)

    def _before_averaging(self, epoch: int, index: int) -> None:
        """Last look at ``param.grad`` before hivemind accumulates it for the all-reduce (honest: untouched)."""

    def _commit(self, epoch: int, records: list[MicroBatchRecord]) -> list[MicroBatchRecord]:
        """The records this node commits to (Merkle root, sketch, samples) and hands over when audited."""
        return records

    def _hand_over(self, epoch: int, task_id: str) -> None:
        """The coordinator audits ``epoch``: send every committed record of it (the Merkle leaves, in order)."""
        records = self.records.get(epoch)
        if records is None:
            logger.warning("epoch %d is audited but its records are gone", epoch)
            return
        protos = [pb.MicroBatchRecord(index=r.index, samples=r.samples, loss=r.loss, grad_norm=r.grad_norm,
                                      sketch=r.sketch.tolist()) for r in records]
        try:
            reply = self.client.submit_audit_records(task_id, protos)
        except grpc.RpcError as e:
            logger.warning("epoch %d: audit records refused: %s %s", epoch, e.code().name, e.details())
            return
        if not reply.accepted:
            logger.error("epoch %d: the coordinator says our records contradict our contribution: %s", epoch,
                         reply.reason)

    def _hold_params(self, epoch: int, started_hash: bytes, started_params: dict[str, torch.Tensor]) -> None:
        """The coordinator audits ``epoch``: keep the parameters it started from for validators to fetch."""
        self.params_server.hold(started_hash, started_params)

    def _update_status(self, records: list[MicroBatchRecord], compute_seconds: float, started: float) -> None:
        opt, status = self.optimizer, self.status
        samples = sum(record.samples for record in records)
        status.samples += records[-1].samples
        status.loss = sum(record.loss for record in records[-8:]) / len(records[-8:])
        status.local_samples_per_second = samples / max(time.perf_counter() - started, 1e-9)
        progress = opt.tracker.global_progress
        status.peers = progress.num_peers
        if opt.local_epoch != status.epoch:
            # the swarm just stepped: it trained target_batch_size samples since the last epoch change
            now = time.perf_counter()
            if self._epoch_started is not None:
                status.swarm_samples_per_second = progress.target_batch_size / max(now - self._epoch_started, 1e-9)
            self._epoch_started = now
        status.last_group_size = opt.grad_group_size
        self.on_status(status)

    def _report(self, epoch: int, assignment: pb.WorkAssignment, started_hash: bytes,
                records: list[MicroBatchRecord], compute_seconds: float,
                started_params: dict[str, torch.Tensor]) -> None:
        records = self._commit(epoch, records)
        samples = sum(record.samples for record in records)
        contribution = pb.Contribution(
            epoch=epoch, assignment_id=assignment.assignment_id, samples=samples,
            mean_loss=sum(record.loss * record.samples for record in records) / samples,
            compute_seconds=compute_seconds, params_hash=started_hash, commitment=merkle_root(records),
            micro_batches=len(records), gradient_sketch=sent_sketch(records).tolist(),
        )
        self.records[epoch] = records
        kept = max(RECORDS_KEPT_EPOCHS, self.spec.verification.audit_window_epochs + 1)
        for old in [e for e in self.records if e <= epoch - kept]:
            del self.records[old]
        try:
            reply = self.client.report_contribution(contribution)
        except grpc.RpcError as e:
            logger.warning("epoch %d: contribution refused: %s %s", epoch, e.code().name, e.details())
            return
        if reply.accepted:
            self.status.contributions += 1
        if reply.audit_task_id:
            self._hold_params(epoch, started_hash, started_params)
            self._hand_over(epoch, reply.audit_task_id)
        logger.info("epoch %d: reported %d samples in %d micro-batches, loss %.4f, %.1f s of compute "
                    "(averaged with %d peers)", epoch, samples, len(records), contribution.mean_loss, compute_seconds,
                    self.optimizer.grad_group_size)

    # ---------------------------------------------------------------- leaving

    def stop(self) -> None:
        """Ask the loop to finish (from a signal handler or another thread)."""
        self._stop.set()

    def shutdown(self) -> None:
        """Leave gracefully: tell the coordinator, then shut the optimizer and the DHT down."""
        self._stop.set()
        if self.client is not None and self._registered:
            try:
                self.client.leave()
                logger.info("left run %s", self.status.run_id)
            except grpc.RpcError as e:
                logger.warning("could not tell the coordinator we left: %s", e.details())
        if self.optimizer is not None:
            if self.config.save_dir is not None:
                self._save(self.config.save_dir)
            self.optimizer.shutdown()
            self.optimizer = None
        if self.params_server is not None:
            self.params_server.shutdown()
            self.params_server = None
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None
        if self.client is not None:
            self.client.close()
        self._set_state("left")


    def _save(self, folder: Path) -> None:
        """The model as this node holds it, in diffusers format, with the epoch it is at (written atomically)."""
        from omi.models import save_pretrained

        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(self.model.to("cpu"), self.scheduler, tmp)
        (tmp / "omi_node.json").write_text(json.dumps({"run_id": self.status.run_id, "node_id": self.status.node_id,
                                                       "epoch": self.optimizer.local_epoch}) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        logger.info("saved the model at epoch %d to %s", self.optimizer.local_epoch, folder)


def install_stop_signals(node: VolunteerNode) -> None:
    """SIGTERM and SIGINT (Ctrl-C) stop the node: finish the micro-batch, leave, shut down.

    hivemind's averagers set SIGINT to "ignore" in this process when they start, so the node installs these
    again once its swarm peer runs. Forked children (DHT, averagers) inherit Python handlers; in them the signal
    keeps its default effect, or hivemind's shutdown (SIGTERM) could not end them.
    """
    main_pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        logger.info("%s received: leaving after this micro-batch", signal.Signals(signum).name)
        node.stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    node.reinstall_signals = functools.partial(install_stop_signals, node)
