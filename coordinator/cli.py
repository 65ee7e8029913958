"""`omi-coordinator`: serve, and the admin commands (`run create|list|pause|resume|stop`, `node ban|unban`,
`validator grant|revoke|list`).

    omi-coordinator serve --run examples/runs/digits.toml
    omi-coordinator run create examples/runs/digits.toml --start
    omi-coordinator run list
    omi-coordinator node ban <node id> --reason "failed audits"
    omi-coordinator validator grant <node id> --reason "lab GPU of the data working group"

The admin commands need only grpc and ``omi.protos``; ``serve`` imports the server (torch, hivemind) and the
dashboard when it runs, and composes them.
"""

import asyncio
import logging
import os
from pathlib import Path

import grpc
import typer
from omi.coordinator.config import DEFAULT_MAX_MESSAGE_BYTES, CoordinatorConfig, ServerConfig, WorkConfig
from omi.coordinator.credentials import ADMIN_TOKEN_FILENAME, TLS_CERT_FILENAME
from omi.coordinator.errors import CoordinatorError
from omi.coordinator.states import RUN_STATE_NAMES
from omi.protos import pb, rpc
from omi.protos.channels import CertificateRefused, open_channel, parse_target, pinned
from rich.console import Console
from rich.table import Table

logger = logging.getLogger(__name__)

app = typer.Typer(help="The omi-swarm coordinator: serve, and administer runs and nodes.", no_args_is_help=True)
run_app = typer.Typer(help="Create and steer runs (admin).", no_args_is_help=True)
node_app = typer.Typer(help="Ban and unban nodes (admin).", no_args_is_help=True)
app.add_typer(run_app, name="run")
app.add_typer(node_app, name="node")
validator_app = typer.Typer(help="Grant and revoke the validator role (admin): only validators take audit tasks.",
                            no_args_is_help=True)
app.add_typer(validator_app, name="validator")
console = Console()
err_console = Console(stderr=True)

COORDINATOR_OPTION = typer.Option("127.0.0.1:50051", "--coordinator", "-c",
                                  help="HOST:PORT of the gRPC API (TLS; pinned to the state dir's certificate, or "
                                       "HOST:PORT#sha256:FINGERPRINT).")
STATE_DIR_OPTION = typer.Option(Path("state"), "--state-dir", help="State dir holding the admin token.")
TOKEN_FILE_OPTION = typer.Option(None, "--admin-token-file", help="File holding the admin token.")


@app.command("serve")
def serve_command(
    state_dir: Path = typer.Option(Path("state"), help="Key, admin token and the SQLite database live here."),
    db: str = typer.Option(None, help="SQLAlchemy URL (e.g. postgresql://user@host/omi); default SQLite in state."),
    grpc_address: str = typer.Option("127.0.0.1:50051", "--grpc", help="HOST:PORT of the gRPC API."),
    http_address: str = typer.Option("127.0.0.1:8080", "--http", help="HOST:PORT of the dashboard; '' for none."),
    run: Path = typer.Option(None, help="RunSpec TOML to create (if new) and start."),
    max_message_bytes: int = typer.Option(DEFAULT_MAX_MESSAGE_BYTES, help="Larger requests are refused."),
    swarm_host: str = typer.Option("127.0.0.1", help="Address of the runs' hivemind bootstrap peers; '' for none."),
    validator: bool = typer.Option(True, "--validator/--no-validator",
                                   help="Run a built-in validator per running run (default): it replays the audited "
                                        "work; without any validator nothing becomes verified (credit stays "
                                        "provisional). --no-validator where granted volunteers validate instead."),
    max_assignments_per_address: int = typer.Option(
        WorkConfig.max_assignments_per_address, min=0,
        help="Assignments one source address may hold per round (0: no cap): identities made by the dozen behind "
             "one address cannot take a round's data. Raise it for a lab behind one NAT."),
    log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING or ERROR."),
) -> None:
    """Run the coordinator until SIGTERM or Ctrl-C."""
    from omi.coordinator.server import serve
    from omi.dashboard.app import create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(state_dir=state_dir, db_url=db, grpc_address=grpc_address, http_address=http_address or None,
                          run_file=run, max_message_bytes=max_message_bytes, swarm_host=swarm_host or None,
                          validator=validator,
                          coordinator=CoordinatorConfig(work=WorkConfig(max_assignments_per_address)))
    try:
        asyncio.run(serve(config, http_app=create_app))
    except (CoordinatorError, OSError) as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None


class AdminClient:
    """Calls the Admin service with the admin token.

    :param address: HOST:PORT of the coordinator's gRPC API (pinned: ``#sha256:`` or :func:`admin_target`)
    :param admin_token: the token written to ``<state dir>/admin_token`` at first start; it travels only over TLS
    """

    def __init__(self, address: str, admin_token: str, *, timeout: float = 10.0):
        self.channel = open_channel(address)
        self.stub = rpc.AdminStub(self.channel)
        self.metadata = (("authorization", f"Bearer {admin_token}"),)
        self.timeout = timeout

    def call(self, method: str, request):
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=self.timeout)

    def close(self) -> None:
        self.channel.close()


def find_admin_token(state_dir: Path, token_file: Path | None) -> str:
    """The admin token from --admin-token-file, else $OMI_ADMIN_TOKEN, else <state dir>/admin_token."""
    if token_file is None and os.environ.get("OMI_ADMIN_TOKEN"):
        return os.environ["OMI_ADMIN_TOKEN"].strip()
    path = token_file or state_dir / ADMIN_TOKEN_FILENAME
    try:
        return path.read_text().strip()
    except OSError as e:
        err_console.print(f"[red]error:[/red] cannot read the admin token from {path} ({e.strerror}); "
                          "pass --state-dir, --admin-token-file or set OMI_ADMIN_TOKEN")
        raise typer.Exit(2) from None


def admin_target(coordinator: str, state_dir: Path) -> str:
    """``coordinator`` pinned to the TLS certificate in ``state_dir`` (the admin runs beside the coordinator), unless
    it carries a fingerprint already or the state dir has no certificate (then: trust on first use)."""
    certificate = state_dir / TLS_CERT_FILENAME
    if parse_target(coordinator).pin is None and certificate.exists():
        return pinned(coordinator, certificate.read_bytes())
    return coordinator


def _connection_error(e: Exception) -> typer.Exit:
    """Print why a call failed (a gRPC status or a refused certificate); the Exit to raise."""
    err_console.print(f"[red]error:[/red] {e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError)
                      else f"[red]error:[/red] {e}")
    return typer.Exit(1)


def _admin(coordinator: str, state_dir: Path, token_file: Path | None, method: str, request):
    token = find_admin_token(state_dir, token_file)
    try:
        client = AdminClient(admin_target(coordinator, state_dir), token)
    except (grpc.RpcError, CertificateRefused) as e:
        raise _connection_error(e) from None
    try:
        return client.call(method, request)
    except grpc.RpcError as e:
        raise _connection_error(e) from None
    finally:
        client.close()


def _print_runs(runs: list[pb.RunSummary]) -> None:
    table = Table("run", "name", "model", "state", "round", "samples", "online")
    for r in runs:
        table.add_row(r.run_id, r.name, r.model, RUN_STATE_NAMES.get(r.state, "?"), str(r.round),
                      f"{r.total_samples:,}", str(r.volunteers_online))
    console.print(table)


@run_app.command("create")
def run_create(file: Path = typer.Argument(..., help="RunSpec TOML file."),
               start: bool = typer.Option(False, help="Start the run right away."),
               coordinator: str = COORDINATOR_OPTION, state_dir: Path = STATE_DIR_OPTION,
               admin_token_file: Path = TOKEN_FILE_OPTION) -> None:
    """Create a run from a RunSpec TOML file (checked by the coordinator; a bad key is named)."""
    try:
        text = file.read_text()
    except OSError as e:
        err_console.print(f"[red]error:[/red] cannot read {file}: {e.strerror}")
        raise typer.Exit(2) from None
    _print_runs([_admin(coordinator, state_dir, admin_token_file, "CreateRun",
                        pb.CreateRunRequest(spec_toml=text, start=start))])


@run_app.command("list")
def run_list(coordinator: str = COORDINATOR_OPTION, state_dir: Path = STATE_DIR_OPTION) -> None:
    """List the runs (public: no token needed)."""
    try:
        with open_channel(admin_target(coordinator, state_dir)) as channel:
            runs = rpc.CoordinatorStub(channel).ListRuns(pb.ListRunsRequest(), timeout=10.0).runs
    except (grpc.RpcError, CertificateRefused) as e:
        raise _connection_error(e) from None
    _print_runs(list(runs))


def _transition(method: str, help_text: str):
    def command(run_id: str = typer.Argument(..., help="Run id."), coordinator: str = COORDINATOR_OPTION,
                state_dir: Path = STATE_DIR_OPTION, admin_token_file: Path = TOKEN_FILE_OPTION) -> None:
        _print_runs([_admin(coordinator, state_dir, admin_token_file, method, pb.RunRequest(run_id=run_id))])
    command.__doc__ = help_text
    return command


run_app.command("pause")(_transition("PauseRun", "Pause a running run."))
run_app.command("resume")(_transition("ResumeRun", "Resume a paused run (or start a created one)."))
run_app.command("stop")(_transition("StopRun", "Stop a run for good."))


@node_app.command("ban")
def node_ban(node_id: str = typer.Argument(..., help="Node id (64 hex characters)."),
             reason: str = typer.Option("", help="Why, for the record."), coordinator: str = COORDINATOR_OPTION,
             state_dir: Path = STATE_DIR_OPTION, admin_token_file: Path = TOKEN_FILE_OPTION) -> None:
    """Ban a node: it cannot register or renew its token any more."""
    reply = _admin(coordinator, state_dir, admin_token_file, "BanNode", pb.BanNodeRequest(node_id=node_id,
                                                                                         reason=reason))
    console.print(f"node {node_id[:12]} banned" if reply.changed else f"node {node_id[:12]} was already banned")


@node_app.command("unban")
def node_unban(node_id: str = typer.Argument(..., help="Node id (64 hex characters)."),
               coordinator: str = COORDINATOR_OPTION, state_dir: Path = STATE_DIR_OPTION,
               admin_token_file: Path = TOKEN_FILE_OPTION) -> None:
    """Lift a node's ban."""
    reply = _admin(coordinator, state_dir, admin_token_file, "UnbanNode", pb.BanNodeRequest(node_id=node_id))
    console.print(f"node {node_id[:12]} unbanned" if reply.changed else f"node {node_id[:12]} was not banned")


@validator_app.command("grant")
def validator_grant(node_id: str = typer.Argument(..., help="Node id (64 hex characters; `omi-node status` shows it)."),
                    reason: str = typer.Option("", help="Why, for the record."),
                    coordinator: str = COORDINATOR_OPTION, state_dir: Path = STATE_DIR_OPTION,
                    admin_token_file: Path = TOKEN_FILE_OPTION) -> None:
    """Let a node validate: take audit tasks (`omi-node validate`) and report verdicts."""
    reply = _admin(coordinator, state_dir, admin_token_file, "GrantValidator",
                   pb.ValidatorRoleRequest(node_id=node_id, reason=reason))
    console.print(f"node {node_id[:12]} is a validator" + ("" if reply.changed else " (it already was)"))


@validator_app.command("revoke")
def validator_revoke(node_id: str = typer.Argument(..., help="Node id (64 hex characters)."),
                     coordinator: str = COORDINATOR_OPTION, state_dir: Path = STATE_DIR_OPTION,
                     admin_token_file: Path = TOKEN_FILE_OPTION) -> None:
    """Take the validator role back; the tasks it holds go to another validator."""
    reply = _admin(coordinator, state_dir, admin_token_file, "RevokeValidator",
                   pb.ValidatorRoleRequest(node_id=node_id))
    console.print(f"node {node_id[:12]} is no longer a validator" if reply.changed
                  else f"node {node_id[:12]} was not a validator")


@validator_app.command("list")
def validator_list(coordinator: str = COORDINATOR_OPTION, state_dir: Path = STATE_DIR_OPTION,
                   admin_token_file: Path = TOKEN_FILE_OPTION) -> None:
    """The nodes holding the validator role."""
    import datetime

    reply = _admin(coordinator, state_dir, admin_token_file, "ListValidators", pb.ListValidatorsRequest())
    if not reply.validators:
        console.print("no validators")
    for grant in reply.validators:  # one line each: the whole node id, for `validator revoke`
        when = datetime.datetime.fromtimestamp(grant.granted_at_ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M")
        console.print(f"{grant.node_id}  granted {when} UTC  {grant.reason}", soft_wrap=True, highlight=False)


if __name__ == "__main__":
    app()
