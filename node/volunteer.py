"""`omi-node join`: a volunteer — its session with the coordinator, its swarm peer, and a trainer.

Run it from the command line (``omi.node.cli`` parses the flags and builds a :class:`NodeConfig`)::

    omi-node join --coordinator 127.0.0.1:50051
    omi-node join --coordinator coord.example.org:50051 --device cuda --state-dir ~/.omi/digits

:class:`VolunteerNode` composes the parts: a :class:`~omi.node.session.NodeSession` (registration, token,
heartbeats), the swarm peer (DHT, round optimizer and state server of :mod:`omi.swarm`, created in this, the main
thread), and a :class:`~omi.node.trainer.Trainer` that trains rounds until Ctrl-C, ``--max-rounds`` or the end
of the run; on leaving it can save the model in diffusers format.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omi.models import build_for_spec, model_info, open_source, pick_device, place_model
from omi.models.segments import held_states
from omi.node.session import NodeError, NodeSession
from omi.node.trainer import NodeStatus, RunStopped, Trainer
from omi.protos import pb

logger = logging.getLogger(__name__)


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
    max_rounds: int = 0  # leave after contributing to this many rounds (0: until Ctrl-C or the run stops)
    connect_attempts: int = 6  # tries to reach the coordinator before giving up (backoff doubles from 1 s)
    threads: int = 0  # torch CPU threads (0: torch's default)
    save_dir: Path | None = None  # on leaving, save the model here in diffusers format (with its round)


class VolunteerNode:
    """One volunteer: session, swarm peer and trainer.

    :param config: the node's settings
    :param on_status: called with the status after every micro-batch (the live view)
    :param trainer_class: the trainer to run (tests/adversaries swap in one with a dishonest hook)

    >>> node = VolunteerNode(NodeConfig(coordinator="127.0.0.1:50051"))  # doctest: +SKIP
    >>> try:  # doctest: +SKIP
    ...     node.run()
    ... finally:
    ...     node.shutdown()
    """

    def __init__(self, config: NodeConfig, on_status: Callable[[NodeStatus], None] | None = None,
                 trainer_class: type[Trainer] | None = None):
        self.config = config
        self.on_status = on_status or (lambda status: None)
        self.trainer_class = trainer_class or Trainer
        self.status = NodeStatus()
        self.session = NodeSession(config.coordinator, config.state_dir, identity=config.identity,
                                   connect_attempts=config.connect_attempts)
        self.stop_event = threading.Event()
        self._leaving = threading.Event()  # set when the node leaves: heartbeats and token renewals end
        self.dht = self.optimizer = self.params_server = self.trainer = None
        self.reinstall_signals: Callable[[], None] | None = None  # what install_stop_signals returned

    @property
    def refused(self) -> str | None:
        """Why the coordinator refused this node, if it did (banned: ``omi-node join`` exits 5)."""
        return self.session.refused

    def _build(self, spec: pb.RunSpec, device) -> None:
        """Model and data, then the swarm peer and the optimizer (in this, the main thread), then the trainer."""
        import torch
        from omi.node.download import resume_from_checkpoint
        from omi.swarm import ParamsServer, RoundOptimizer, start_dht

        config = self.config
        if config.threads:
            torch.set_num_threads(config.threads)
        info = model_info(spec.model)
        model, scheduler = build_for_spec(spec)
        place_model(model, device)
        source = open_source(spec.data, channels=info.channels)
        micro_batch_size = config.batch_size or spec.training.micro_batch_size
        logger.info("model %s (%d parameters) on %s; data %s", spec.model, info.parameters, device, source)
        self.dht = start_dht(spec, self.session.tokens, swarm_key=self.session.swarm_key,
                             identity_path=config.state_dir / "p2p.id", host=config.host, port=config.port,
                             client_mode=config.client_mode, announce_host=config.announce)
        logger.info("joined the swarm as %s, listening on %s", self.session.peer_id,
                    [str(m) for m in self.dht.get_visible_maddrs()])
        self.optimizer = RoundOptimizer(model, spec, self.dht, client_mode=config.client_mode)
        logger.info("rounds of %d inner steps per node, outer SGD lr %g momentum %g%s, %s pseudo-gradients%s",
                    spec.rounds.inner_steps, spec.rounds.outer_learning_rate, spec.rounds.outer_momentum,
                    " (Nesterov)" if spec.rounds.outer_nesterov else "", spec.rounds.compression,
                    ", overlapped with the next round" if spec.rounds.overlap else "")
        self.params_server = ParamsServer.start(self.dht, spec, keep=held_states(spec))
        # resume (issue 5): when no peer holds state as new as the coordinator's latest checkpoint, start from it
        resume_from_checkpoint(self.session.client, spec, model, self.optimizer, config.state_dir / "checkpoints")
        self.trainer = self.trainer_class(self.session, spec, model=model, scheduler=scheduler, source=source,
                                          optimizer=self.optimizer, params_server=self.params_server,
                                          micro_batch_size=micro_batch_size, status=self.status,
                                          on_status=self.on_status, stop=self.stop_event,
                                          segments_dir=config.state_dir / "segments")

    def _beat(self) -> dict:
        status = self.status
        return dict(round_number=status.round, samples_per_second=status.local_samples_per_second,
                    swarm_peers=status.peers, loss=status.loss)

    def run(self) -> NodeStatus:
        """Train until Ctrl-C, ``max_rounds`` contributions, or the run stops; returns the final status."""
        try:
            device = pick_device(self.config.device)
        except ValueError as e:
            raise NodeError(str(e), exit_code=2) from e
        spec = self.session.open(self.config.run_id, self.config.display_name)
        self.status.run_id, self.status.node_id = spec.run_id, self.session.node_id
        self._build(spec, device)
        if self.reinstall_signals is not None:
            self.reinstall_signals()  # hivemind's averagers just set SIGINT to "ignore"
        # until the node leaves, not until it is asked to stop: the round it finishes after a Ctrl-C is reported with
        # a token that must still be valid (seen: a SIGTERM during an all-reduce, the report 18 s later refused as
        # "access token expired" with a 30 s token)
        self.session.start_heartbeats(spec.liveness.heartbeat_interval, self._leaving, self._beat,
                                      on_refused=self.stop)
        try:
            while not self.stop_event.is_set():
                if self.config.max_rounds and self.status.contributions >= self.config.max_rounds:
                    logger.info("contributed to %d rounds, leaving as asked (--max-rounds)", self.status.contributions)
                    break
                self.trainer.train_round()
        except RunStopped:
            logger.info("run %s was stopped by its coordinator; leaving", spec.run_id)
        return self.status

    def stop(self) -> None:
        """Ask the loop to finish (from a signal handler or another thread)."""
        self.stop_event.set()

    def shutdown(self) -> None:
        """Leave gracefully: tell the coordinator, then shut the optimizer and the DHT down."""
        self.stop_event.set()
        self._leaving.set()
        self.session.leave(self.status.run_id)
        timings, tick = [], time.perf_counter()  # a slow leave says where its time went

        def took(what: str) -> None:
            nonlocal tick
            now = time.perf_counter()
            timings.append(f"{what} {now - tick:.1f} s")
            tick = now

        if self.optimizer is not None:
            if self.config.save_dir is not None and self.trainer is not None:
                self._save(self.config.save_dir)
            self.optimizer.shutdown()  # hivemind says goodbye, may finish an all-reduce others started with us
            self.optimizer = None
            took("optimizer")
        if self.params_server is not None:
            self.params_server.shutdown()
            self.params_server = None
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None
            took("DHT")
        self.session.close()
        if timings:
            logger.info("left the swarm (%s)", ", ".join(timings))
        if self.trainer is not None:
            self.trainer.set_state("left")

    def _save(self, folder: Path) -> None:
        """θ of the round this node holds, in diffusers format, with that round (written atomically). A round left
        unfinished is not saved: its inner steps were never averaged."""
        from omi.models.sampling import run_drawing, save_model
        from omi.swarm.diloco import reset_to

        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = self.trainer.model
        reset_to([p for p in model.parameters() if p.requires_grad], self.optimizer.global_params)
        parts, _ = run_drawing(self.trainer.source)
        save_model(model.to("cpu"), self.trainer.scheduler, tmp, parts=parts)
        (tmp / "omi_node.json").write_text(json.dumps({"run_id": self.status.run_id, "node_id": self.status.node_id,
                                                       "round": self.optimizer.round}) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        logger.info("saved θ of round %d to %s", self.optimizer.round, folder)
