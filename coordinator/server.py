"""`omi-coordinator serve`: the gRPC API (with health and reflection) and an HTTP app in one asyncio loop.

The coordinator package does not import the dashboard: the HTTP app comes in as a factory (``http_app``), which
``omi-coordinator serve`` fills with :func:`omi.dashboard.app.create_app`. Domain calls run in the coordinator's
worker thread (:meth:`omi.coordinator.core.Coordinator.call`), so the loop only moves bytes; what a run needs once it
is running (its swarm bootstrap peer, a process of its own, and its opened data source) starts when it starts.
"""

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from omi.coordinator.bootstrap import STARTUP_TIMEOUT, SwarmBootstrap
from omi.coordinator.checkpointer import CheckpointerSupervisor
from omi.coordinator.config import ServerConfig
from omi.coordinator.core import Coordinator
from omi.coordinator.credentials import (
    ADMIN_TOKEN_FILENAME,
    load_or_create_admin_token,
    load_or_create_coordinator_key,
    load_or_create_tls,
)
from omi.coordinator.errors import CoordinatorError, FailedPrecondition, InvalidArgument, Unavailable
from omi.coordinator.servicer import add_services
from omi.coordinator.states import RUN_STATE_NAMES
from omi.coordinator.validators import BuiltinValidators
from omi.coordinator.work import ShardLayout, data_layout
from omi.protos import pb
from omi.protos.channels import fingerprint, pinned
from omi.protos.clock import now_ms
from omi.protos.runspec import RunSpecError

logger = logging.getLogger(__name__)

HttpApp = Callable[[Coordinator], Any]  # the coordinator -> an ASGI app, e.g. omi.dashboard.app.create_app


class CoordinatorServer:
    """The coordinator's gRPC server, with an HTTP app beside it when ``config.http_address`` is set.

    :param config: where state lives and where to listen
    :param http_app: builds the app served on ``config.http_address`` (the CLI passes the dashboard's
      ``create_app``); required when ``http_address`` is set
    :param layout: DataSpec -> ShardLayout (benchmarks pass a synthetic one; by default the run's real data)
    :param clock: wall-clock milliseconds of the registry, the work planner and the heartbeats

    What ``omi-coordinator serve`` does, ``create_app`` being :func:`omi.dashboard.app.create_app`:

    >>> server = CoordinatorServer(ServerConfig(state_dir=Path("state")), http_app=create_app)  # doctest: +SKIP
    >>> asyncio.run(server.start())  # doctest: +SKIP
    """

    def __init__(self, config: ServerConfig, *, http_app: HttpApp | None = None,
                 layout: Callable[[pb.DataSpec], ShardLayout] = data_layout, clock: Callable[[], int] = now_ms):
        if config.http_address and http_app is None:
            raise ValueError("ServerConfig.http_address needs an http_app (e.g. omi.dashboard.app.create_app); "
                             "set http_address=None for no HTTP")
        self.config, self.http_app = config, http_app
        self.bootstrap: SwarmBootstrap | None = None
        if config.swarm_host is not None:
            self.bootstrap = SwarmBootstrap(load_or_create_coordinator_key(config.state_dir), config.state_dir,
                                            config.swarm_host, db_url=config.db_url)
        # checkpoint folders live in the state dir and are served on the HTTP port
        self.coordinator = Coordinator.open(
            config.state_dir, config.db_url, config.coordinator, layout=layout, clock=clock,
            swarm_peers=None if self.bootstrap is None else self.bootstrap.initial_peers,
            public_url=f"http://{config.http_address}" if config.http_address else "")
        self.admin_token = load_or_create_admin_token(config.state_dir)
        self.tls_key, self.tls_certificate = load_or_create_tls(config.state_dir)
        self.grpc_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task] = []
        self._http = None
        self._http_task: asyncio.Task | None = None
        self._running_runs: set[str] = set()  # runs whose swarm peer and data source this server has started
        self.validators: BuiltinValidators | None = None
        self._validated_runs: set[str] = set()  # runs whose built-in validator runs
        self.checkpointers: CheckpointerSupervisor | None = None

    @property
    def target(self) -> str:
        """``HOST:PORT#sha256:<fingerprint>`` of the gRPC API once it listens: what a node passes as
        ``--coordinator`` to pin this coordinator's certificate (:mod:`omi.protos.channels`)."""
        host = self.config.grpc_address.rsplit(":", 1)[0]
        return pinned(f"{'127.0.0.1' if host in ('', '0.0.0.0', '[::]') else host}:{self.grpc_port}",
                      self.tls_certificate)

    async def start(self) -> None:
        """Prepare the default run, start the running runs' swarm peers, bind the ports and start serving."""
        if self.config.run_file is not None:
            self.ensure_run(self.config.run_file)
        self._start_running_runs()
        if self.bootstrap is not None:
            # the checkpointer is a swarm peer (without a swarm there is nothing to pull); it starts up beside the
            # bootstrap peer (both import torch and hivemind, ~3 s each) and is handed its addresses once it listens
            self.checkpointers = CheckpointerSupervisor(
                self.config.state_dir, self.config.db_url, self.coordinator.runs, self.bootstrap.initial_peers,
                host=self.config.swarm_host, public_url=self.coordinator.checkpoints.public_url)
            # serve once the running runs' peers listen: every registration hands them out
            for run_id in sorted(self._running_runs):
                await asyncio.to_thread(self.bootstrap.initial_peers, self.coordinator.runs.get(run_id).spec,
                                        timeout=STARTUP_TIMEOUT)
        limit = self.config.max_message_bytes
        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                                ("grpc.max_send_message_length", limit)])
        names = add_services(self._server, self.coordinator, self.admin_token, run_started=self._run_started_later)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self._server)
        for name in ["", *names]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server)
        self.grpc_port = self._server.add_secure_port(
            self.config.grpc_address, grpc.ssl_server_credentials([(self.tls_key, self.tls_certificate)]))
        if not self.grpc_port:
            raise OSError(f"cannot listen on {self.config.grpc_address}")
        await self._server.start()
        host = self.config.grpc_address.rsplit(":", 1)[0]
        logger.info("coordinator gRPC API listening on %s:%d (state in %s, database %s)", host, self.grpc_port,
                    self.config.state_dir, self.coordinator.store.engine.url.render_as_string(hide_password=True))
        logger.info("admin token in %s; TLS certificate sha256:%s (nodes pin it: --coordinator '%s')",
                    Path(self.config.state_dir) / ADMIN_TOKEN_FILENAME, fingerprint(self.tls_certificate),
                    self.target)
        self._tasks.append(asyncio.create_task(self.coordinator.maintain()))
        self._tasks.append(asyncio.create_task(self._follow_runs()))
        if self.bootstrap is not None and self.config.validator:
            self._start_validators(host)
        if self.config.http_address:
            await self._start_http(self.config.http_address)

    def _run_started(self, run_id: str) -> None:
        """Run ``run_id`` is running: start its swarm peer process and open its data source (in a thread of its own)
        now, so that neither waits for the first Register or GetWork."""
        if run_id not in self._running_runs:
            if self.bootstrap is not None:
                self.bootstrap.start(self.coordinator.runs.get(run_id).spec)
            self._running_runs.add(run_id)
            threading.Thread(target=self._open_data, args=(run_id,), name=f"open-data-{run_id}", daemon=True).start()
        if self.validators is not None and run_id not in self._validated_runs:  # a run started after serve started
            self._start_validator(run_id)

    def _run_started_later(self, run_id: str) -> None:
        """After an admin RPC started or resumed a run: as :meth:`_run_started`, retried by ``_follow_runs``."""
        try:
            self._run_started(run_id)
        except Exception:
            logger.exception("run %s: starting its swarm peer failed; retrying", run_id)

    def _open_data(self, run_id: str) -> None:
        try:
            self.coordinator.work.layout(run_id)
        except CoordinatorError as e:
            logger.warning("run %s: %s (GetWork tries again)", run_id, e)
        except Exception:
            logger.exception("run %s: opening the data source failed (GetWork tries again)", run_id)

    def _start_running_runs(self) -> None:
        runs = self.coordinator.runs
        for run_id in runs.run_ids():
            if runs.get(run_id).state == pb.RUN_STATE_RUNNING:
                self._run_started(run_id)

    async def _follow_runs(self) -> None:
        """Start what running runs need that is not running yet: a start that failed, or a run another coordinator
        process on the same database started (this one sees it at its next refresh)."""
        while True:
            await asyncio.sleep(self.coordinator.config.flush_interval)
            try:
                self._start_running_runs()
            except Exception:
                logger.exception("starting a run's swarm peer failed; retrying at the next interval")

    def _start_validators(self, host: str) -> None:
        """The built-in validator of every running run (a process of its own; see omi.coordinator.validators); runs
        started later get theirs from :meth:`_run_started`."""
        self.validators = BuiltinValidators(self.coordinator.key, self.config.state_dir)
        self._validator_address = self.target
        runs = self.coordinator.runs
        for run_id in runs.run_ids():
            if runs.get(run_id).state == pb.RUN_STATE_RUNNING:
                self._start_validator(run_id)

    def _start_validator(self, run_id: str) -> None:
        """Start run ``run_id``'s built-in validator (once) and grant it the validator role; while the run's swarm
        peer is still starting this waits for the next call (``_follow_runs`` calls again every flush interval)."""
        try:
            spec = self.coordinator.runs.spec_for_nodes(run_id)
        except Unavailable:
            return
        node_id = self.validators.start(spec, self._validator_address)
        if node_id is not None:
            self.coordinator.auditor.grant(node_id, f"built-in validator of run {run_id}")
            self.coordinator.auditor.trust(node_id)  # the coordinator's own: its verdicts decide
        self._validated_runs.add(run_id)

    def ensure_run(self, run_file: Path) -> None:
        """Create the run of ``run_file`` if it is new and make sure it is running."""
        from omi.protos.runspec import load_runspec

        try:
            spec = load_runspec(run_file)
        except RunSpecError as e:
            raise InvalidArgument(f"{run_file}: {e}") from e
        runs = self.coordinator.runs
        if not runs.exists(spec.run_id):
            runs.create(Path(run_file).read_text(), start=True)
        elif runs.get(spec.run_id).state in (pb.RUN_STATE_CREATED, pb.RUN_STATE_PAUSED):
            runs.transition(spec.run_id, "resume")
        elif runs.get(spec.run_id).state == pb.RUN_STATE_STOPPED:
            raise FailedPrecondition(f"run '{spec.run_id}' of {run_file} is stopped; create a run with a new id")
        logger.info("run %s (%s): %s", spec.run_id, run_file, RUN_STATE_NAMES[runs.get(spec.run_id).state])

    async def _start_http(self, address: str) -> None:
        import uvicorn

        host, port = address.rsplit(":", 1)
        config = uvicorn.Config(self.http_app(self.coordinator), host=host, port=int(port), log_level="warning",
                                lifespan="off")
        self._http = uvicorn.Server(config)
        self._http.install_signal_handlers = lambda: None  # serve() handles SIGTERM/SIGINT for both servers
        self._http_task = asyncio.create_task(self._http.serve())
        while not self._http.started:
            if self._http_task.done():
                raise OSError(f"the HTTP app could not listen on {address}")
            await asyncio.sleep(0.05)
        logger.info("HTTP app (dashboard) listening on http://%s", address)

    async def stop(self, grace: float = 5.0) -> None:
        """Finish in-flight RPCs (up to ``grace`` seconds), stop HTTP, flush and close the store."""
        if self._server is not None:
            await self._server.stop(grace)
        if self.validators is not None:
            self.validators.shutdown()
        if self._http_task is not None:
            self._http.should_exit = True
            await asyncio.gather(self._http_task, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.checkpointers is not None:
            self.checkpointers.shutdown()
        if self.bootstrap is not None:
            self.bootstrap.shutdown()
        self.coordinator.close()
        logger.info("coordinator stopped")


async def serve(config: ServerConfig, *, http_app: HttpApp | None = None) -> None:
    """Run the coordinator until SIGTERM or SIGINT, then shut down gracefully."""
    server = CoordinatorServer(config, http_app=http_app)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        await stop.wait()
        logger.info("shutting down")
    finally:
        await server.stop()
