"""`omi-coordinator serve`: the gRPC API (with health and reflection) and the dashboard in one asyncio loop."""

import asyncio
import logging
import os
import secrets
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from omi.coordinator.bootstrap import SwarmBootstrap
from omi.coordinator.checkpointer import CheckpointerSupervisor
from omi.coordinator.core import Coordinator, CoordinatorConfig
from omi.coordinator.errors import FailedPrecondition, InvalidArgument
from omi.coordinator.runs import STATE_NAMES
from omi.coordinator.servicer import add_services
from omi.coordinator.validators import BuiltinValidators
from omi.protos import pb
from omi.protos.runspec import RunSpecError

logger = logging.getLogger(__name__)

ADMIN_TOKEN_FILENAME = "admin_token"
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def load_or_create_admin_token(state_dir: str | Path) -> str:
    """The admin token of a state dir, created (mode 0600) at first start."""
    path = Path(state_dir) / ADMIN_TOKEN_FILENAME
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    logger.info("created the admin token in %s", path)
    return token


@dataclass
class ServerConfig:
    state_dir: Path = Path("state")              # key, admin token and (by default) the SQLite database
    db_url: str | None = None                    # SQLAlchemy URL; None = SQLite under state_dir
    grpc_address: str = "127.0.0.1:50051"        # HOST:PORT of the gRPC API (port 0 = any free port)
    http_address: str | None = "127.0.0.1:8080"  # HOST:PORT of the dashboard; None = no HTTP
    run_file: Path | None = None                 # RunSpec TOML created (if new) and started at startup
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # larger requests get RESOURCE_EXHAUSTED
    swarm_host: str | None = "127.0.0.1"         # where runs' hivemind bootstrap peers listen; None = no swarm peer
    validator: bool = False                      # start the built-in validator of each running run (needs swarm_host)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)


class CoordinatorServer:
    """The coordinator's gRPC (and optional HTTP) server.

    :param config: where state lives and where to listen
    :param coordinator: the domain objects; by default ``Coordinator.open(config.state_dir, config.db_url)``
    """

    def __init__(self, config: ServerConfig, coordinator: Coordinator | None = None):
        self.config = config
        self.coordinator = coordinator or Coordinator.open(config.state_dir, config.db_url, config.coordinator)
        self.admin_token = load_or_create_admin_token(config.state_dir)
        self.grpc_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._maintain: asyncio.Task | None = None
        self._http = None
        self._http_task: asyncio.Task | None = None
        self.bootstrap: SwarmBootstrap | None = None
        self.validators: BuiltinValidators | None = None
        if config.swarm_host is not None:
            self.bootstrap = SwarmBootstrap(self.coordinator.key, config.state_dir, config.swarm_host)
            self.coordinator.runs.swarm_peers = self.bootstrap.initial_peers
        # checkpoint folders live in the state dir and are served on the HTTP port
        self.coordinator.checkpoints.state_dir = Path(config.state_dir)
        self.coordinator.checkpoints.public_url = f"http://{config.http_address}" if config.http_address else ""
        self.checkpointers: CheckpointerSupervisor | None = None
        self._checkpointers_task: asyncio.Task | None = None

    async def start(self) -> None:
        """Prepare the default run, start the running runs' swarm peers, bind the ports and start serving."""
        if self.config.run_file is not None:
            self.ensure_run(self.config.run_file)
        if self.bootstrap is not None:
            runs = self.coordinator.runs
            for run_id in runs.run_ids():
                if runs.get(run_id).state == pb.RUN_STATE_RUNNING:
                    runs.spec_for_nodes(run_id)  # starts the bootstrap peer now rather than at the first Register
        limit = self.config.max_message_bytes
        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                                ("grpc.max_send_message_length", limit)])
        names = add_services(self._server, self.coordinator, self.admin_token)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self._server)
        for name in ["", *names]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server)
        self.grpc_port = self._server.add_insecure_port(self.config.grpc_address)
        if not self.grpc_port:
            raise OSError(f"cannot listen on {self.config.grpc_address}")
        await self._server.start()
        host = self.config.grpc_address.rsplit(":", 1)[0]
        logger.info("coordinator gRPC API listening on %s:%d (state in %s, database %s)", host, self.grpc_port,
                    self.config.state_dir, self.coordinator.store.engine.url.render_as_string(hide_password=True))
        logger.info("admin token in %s", Path(self.config.state_dir) / ADMIN_TOKEN_FILENAME)
        self._maintain = asyncio.create_task(self.coordinator.maintain())
        if self.bootstrap is not None and self.config.validator:
            self._start_validators(host)
        if self.config.http_address:
            await self._start_http(self.config.http_address)
        if self.bootstrap is not None:  # the checkpointer is a swarm peer: without a swarm there is nothing to pull
            self.checkpointers = CheckpointerSupervisor(
                self.config.state_dir, self.config.db_url, self.coordinator.runs, self.bootstrap.initial_peers,
                host=self.config.swarm_host, public_url=self.coordinator.checkpoints.public_url)
            self._checkpointers_task = asyncio.create_task(self.checkpointers.supervise())

    def _start_validators(self, host: str) -> None:
        """The built-in validator of every running run (a process of its own; see omi.coordinator.validators)."""
        self.validators = BuiltinValidators(self.coordinator.key, self.config.state_dir)
        address = f"{'127.0.0.1' if host in ('', '0.0.0.0', '[::]') else host}:{self.grpc_port}"
        runs = self.coordinator.runs
        for run_id in runs.run_ids():
            if runs.get(run_id).state == pb.RUN_STATE_RUNNING:
                self.validators.start(runs.spec_for_nodes(run_id), address)

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
        logger.info("run %s (%s): %s", spec.run_id, run_file, STATE_NAMES[runs.get(spec.run_id).state])

    async def _start_http(self, address: str) -> None:
        import uvicorn
        from omi.dashboard.app import create_app

        host, port = address.rsplit(":", 1)
        config = uvicorn.Config(create_app(self.coordinator), host=host, port=int(port), log_level="warning",
                                lifespan="off")
        self._http = uvicorn.Server(config)
        self._http.install_signal_handlers = lambda: None  # serve() handles SIGTERM/SIGINT for both servers
        self._http_task = asyncio.create_task(self._http.serve())
        while not self._http.started:
            if self._http_task.done():
                raise OSError(f"dashboard could not listen on {address}")
            await asyncio.sleep(0.05)
        logger.info("dashboard listening on http://%s", address)

    async def stop(self, grace: float = 5.0) -> None:
        """Finish in-flight RPCs (up to ``grace`` seconds), stop HTTP, flush and close the store."""
        if self._server is not None:
            await self._server.stop(grace)
        if self.validators is not None:
            self.validators.shutdown()
        if self._http_task is not None:
            self._http.should_exit = True
            await asyncio.gather(self._http_task, return_exceptions=True)
        if self._maintain is not None:
            self._maintain.cancel()
            await asyncio.gather(self._maintain, return_exceptions=True)
        if self._checkpointers_task is not None:
            self._checkpointers_task.cancel()
            await asyncio.gather(self._checkpointers_task, return_exceptions=True)
            self.checkpointers.shutdown()
        if self.bootstrap is not None:
            self.bootstrap.shutdown()
        self.coordinator.close()
        logger.info("coordinator stopped")


async def serve(config: ServerConfig) -> None:
    """Run the coordinator until SIGTERM or SIGINT, then shut down gracefully."""
    server = CoordinatorServer(config)
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
