"""The ``omi-node`` command line: one function per command; each parses its arguments and calls the domain code.

    omi-node train-local --run examples/runs/digits.toml --samples 20000 --out runs/digits-local
    omi-node sample runs/digits-local --n 16 --out grid.png
    omi-node sample runs/captioned-local --prompt "a handwritten digit seven" --n 8 --out sevens.png
"""

import logging
from pathlib import Path

import typer
from rich import get_console
from rich.logging import RichHandler

app = typer.Typer(help="A volunteer node of omi-swarm.", no_args_is_help=True, add_completion=False)
console = get_console()  # the one rich progress bars and log lines share, so they do not garble each other
logger = logging.getLogger(__name__)
COORDINATOR_HELP = ("HOST:PORT of the coordinator's gRPC API (TLS). Append #sha256:FINGERPRINT (the serve log prints "
                    "it) to pin its certificate; without it the first certificate seen is trusted and remembered in "
                    "STATE_DIR/known_coordinators.json, and a changed one is refused.")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if console.is_terminal:
        logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    else:  # a log file or a pipe: one unwrapped, greppable line per record
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command("train-local")
def train_local(
    run: Path = typer.Option(..., "--run", help="RunSpec TOML file."),
    samples: int = typer.Option(..., "--samples", min=1, help="Samples to train on."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    out: Path | None = typer.Option(None, "--out", help="Save the diffusers checkpoint and preview.png here."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1,
                                          help="Samples per optimizer step (default: one micro-batch of the RunSpec)."),
    quality_samples: int = typer.Option(256, "--quality-samples", min=0,
                                        help="Digits generated for the quality score (0: skip it)."),
) -> None:
    """Train a RunSpec in this process, without a swarm: the baseline swarm training is compared against."""
    # Imported here so `omi-node --help` and the light commands stay fast (torch and diffusers take seconds).
    from omi.models.train_local import train_local as run_train_local
    from omi.protos.runspec import RunSpecError, load_runspec

    try:
        spec = load_runspec(run)
        result = run_train_local(spec, samples, device=device, out_dir=out, batch_size=batch_size,
                                 quality_samples=quality_samples)
    except (RunSpecError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    console.print(f"[bold]{spec.run_id}[/bold]: {result.samples} samples in {result.seconds:.1f} s "
                  f"({result.samples_per_second:.0f} samples/s), {result.optimizer_steps} optimizer steps, "
                  f"final loss {result.final_loss:.4f}")
    if result.quality is not None:
        console.print(f"quality: {result.quality}")
    if out is not None:
        console.print(f"checkpoint: {out}  preview: {out / 'preview.png'}")


@app.command("sample")
def sample(
    checkpoint: Path = typer.Argument(..., help="A diffusers DDPMPipeline or SanaPipeline folder (train-local --out, "
                                                "omi-node download)."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Text-to-image checkpoints: a prompt (repeatable; "
                                                                "the images cycle through them)."),
    n: int = typer.Option(16, "--n", min=1, help="Number of images."),
    out: Path = typer.Option(Path("grid.png"), "--out", help="PNG file for the image grid."),
    steps: int = typer.Option(50, "--steps", min=1, help="DDIM steps (a UNet) or Euler steps (a text-to-image model)."),
    guidance: float = typer.Option(4.5, "--guidance", min=1.0, help="Classifier-free guidance of prompts (1: off)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial noise."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Generate images from a checkpoint (from prompts, for a text-to-image one) and save them as one grid PNG."""
    from omi.models.device import pick_device
    from omi.models.sampling import generate, load_pretrained, save_grid
    from omi.models.text_to_image import generate_from_prompts, load_text_to_image

    text_to_image = (checkpoint / "transformer").is_dir()
    if text_to_image and not prompt:
        console.print(f"[red]error:[/red] {checkpoint} is a text-to-image checkpoint: give --prompt \"...\"")
        raise typer.Exit(2)
    if prompt and not text_to_image:
        console.print(f"[red]error:[/red] {checkpoint} is not a text-to-image checkpoint: it takes no --prompt")
        raise typer.Exit(2)
    try:
        if text_to_image:
            model, scheduler, parts = load_text_to_image(checkpoint, device=pick_device(device))
        else:
            model, scheduler = load_pretrained(checkpoint, device=pick_device(device))
    except (OSError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    if text_to_image:
        prompts = [prompt[i % len(prompt)] for i in range(n)]
        images = generate_from_prompts(model, scheduler, parts, prompts, steps=steps, seed=seed,
                                       guidance_scale=guidance)
    else:
        images = generate(model, scheduler, n, steps, seed)
    save_grid(images, out, nrow=len(prompt) if 1 < len(prompt) <= 16 else None)
    console.print(f"{n} images from {checkpoint} -> {out}")


@app.command("join")
def join(
    coordinator: str = typer.Option(..., "--coordinator", "-c", help=COORDINATOR_HELP),
    run: str = typer.Option("", "--run", help="Run to join (default: the coordinator's only running run)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(0, "--batch-size", min=0, help="Micro-batch size (default: the RunSpec's)."),
    identity: Path | None = typer.Option(None, "--identity", help="Ed25519 key (default: STATE_DIR/node_key.pem)."),
    state_dir: Path = typer.Option(Path.home() / ".omi", "--state-dir", envvar="OMI_HOME",
                                   help="Identity, swarm keys and token live here."),
    name: str = typer.Option("", "--name", help="Display name on the dashboard."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the swarm peer listens on (0.0.0.0: all)."),
    port: int = typer.Option(0, "--port", min=0, max=65535, help="TCP port of the swarm peer (0: any free one)."),
    announce: str | None = typer.Option(None, "--announce", help="Address other peers dial (needs --port)."),
    client_mode: bool = typer.Option(False, "--client-mode", help="Behind NAT: outgoing connections only."),
    max_rounds: int = typer.Option(0, "--max-rounds", min=0, help="Leave after this many contributions (0: never)."),
    threads: int = typer.Option(0, "--threads", min=0, help="torch CPU threads (0: torch's default)."),
    save: Path | None = typer.Option(None, "--save",
                                     help="On leaving, save θ of the round this node holds here (diffusers format)."),
    connect_attempts: int = typer.Option(6, "--connect-attempts", min=1,
                                         help="Tries to reach the coordinator (waits 1, 2, 4, … s between)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live view; log lines only."),
    log_json: bool = typer.Option(False, "--log-json", help="Log one JSON object per line (implies --quiet)."),
) -> None:
    """Join a training run as a volunteer: train in the swarm and report contributions until Ctrl-C."""
    from omi.node.session import NodeError
    from omi.node.view import JsonFormatter, LiveView
    from omi.node.volunteer import NodeConfig, VolunteerNode
    from omi.swarm.signals import install_stop_signals

    if log_json:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    config = NodeConfig(coordinator=coordinator, run_id=run, device=device, batch_size=batch_size,
                        state_dir=state_dir, identity=identity, display_name=name, host=host, port=port,
                        announce=announce, client_mode=client_mode, max_rounds=max_rounds, threads=threads,
                        save_dir=save, connect_attempts=connect_attempts)
    view = None if (quiet or log_json or not console.is_terminal) else LiveView(console)
    node = VolunteerNode(config, on_status=view.update if view else None)
    node.reinstall_signals = install_stop_signals(node.stop)
    try:
        if view is not None:
            with view:
                status = node.run()
        else:
            status = node.run()
    except NodeError as e:
        logger.error("%s", e)
        raise typer.Exit(e.exit_code) from None
    finally:
        node.shutdown()
    logger.info("done: %d samples trained, %d contributions accepted", status.samples, status.contributions)
    if node.refused:
        raise typer.Exit(5)


@app.command("download")
def download(
    run: str = typer.Argument(..., help="Run id."),
    checkpoint: str = typer.Option("latest", "--checkpoint", help="Round number or 'latest'."),
    out: Path | None = typer.Option(None, "--out", help="Folder to write (default: RUN-round-E here)."),
    coordinator: str | None = typer.Option(None, "--coordinator", "-c",
                                           help=COORDINATOR_HELP + " Gives the coordinator's key and the URL."),
    http: str | None = typer.Option(None, "--http", help="Base URL of the coordinator's HTTP port "
                                                          "(default: from the coordinator's checkpoint list)."),
    coordinator_key: str | None = typer.Option(None, "--coordinator-key",
                                               help="Pinned coordinator public key (64 hex characters)."),
    state_dir: Path = typer.Option(Path.home() / ".omi", "--state-dir", envvar="OMI_HOME",
                                   help="Where the newest round verified per run is remembered (a 'latest' older "
                                        "than it is refused as a rollback)."),
) -> None:
    """Download a checkpoint, resumably; refuse it unless the coordinator's signature and every sha256 check out."""
    from omi.node.download import DownloadError, SeenCheckpoints, download_checkpoint
    from omi.protos.channels import KNOWN_FILENAME

    if checkpoint != "latest" and not checkpoint.isdigit():
        console.print(f"[red]error:[/red] --checkpoint must be a round number or 'latest', got {checkpoint!r}")
        raise typer.Exit(2)
    round_number = None if checkpoint == "latest" else int(checkpoint)
    try:
        public_key, folder_url = _checkpoint_source(run, round_number, coordinator, http, coordinator_key,
                                                    state_dir / KNOWN_FILENAME)
        result = download_checkpoint(folder_url, run, out, public_key, round_number=round_number, console=console,
                                     progress=console.is_terminal,
                                     seen=SeenCheckpoints(state_dir / "checkpoints-seen.json"))
    except DownloadError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(e.exit_code) from None
    mib = result.total_bytes / 2**20
    console.print(f"run {run} round {result.round}: {len(result.manifest.files)} files, {mib:.1f} MiB verified "
                  f"(signature and sha256) in {result.folder} ({result.downloaded_bytes / 2**20:.1f} MiB fetched "
                  f"in {result.seconds:.1f} s)")


def _checkpoint_source(run: str, round_number: int | None, coordinator: str | None, http: str | None,
                       coordinator_key: str | None, known: Path) -> tuple[bytes, str]:
    """(the coordinator's public key, the checkpoint folder URL) from the flags and, if needed, the gRPC API."""
    import grpc
    from omi.node.download import DownloadError
    from omi.protos import pb, rpc
    from omi.protos.channels import CertificateRefused, open_channel
    from omi.protos.refusals import refusal_of

    public_key = None
    if coordinator_key:
        try:
            public_key = bytes.fromhex(coordinator_key)
        except ValueError:
            public_key = b""
        if len(public_key) != 32:
            raise DownloadError("--coordinator-key must be 64 hex characters (a raw Ed25519 key)", 2)
    if coordinator is None:
        if http is None or public_key is None:
            raise DownloadError("pass --coordinator HOST:PORT, or both --http URL and --coordinator-key", 2)
        return public_key, _folder_url(http, run, round_number)
    try:
        with open_channel(coordinator, known=known) as channel:
            stub = rpc.CoordinatorStub(channel)
            if public_key is None:
                public_key = stub.GetRunSpec(pb.GetRunSpecRequest(run_id=run), timeout=10).coordinator_public_key
            if http is not None:
                return public_key, _folder_url(http, run, round_number)
            listed = stub.ListCheckpoints(pb.ListCheckpointsRequest(run_id=run), timeout=10).checkpoints
    except grpc.RpcError as e:
        code = 4 if refusal_of(e) == pb.REFUSAL_UNKNOWN_RUN else 3
        raise DownloadError(f"coordinator {coordinator}: {e.code().name}: {e.details()}", code) from None
    except CertificateRefused as e:
        raise DownloadError(str(e), 5) from None
    chosen = [c for c in listed if round_number is None or c.round == round_number]
    if not chosen:
        raise DownloadError(f"run {run} has no checkpoint {round_number if round_number is not None else ''} "
                            f"(listed: {', '.join(str(c.round) for c in listed) or 'none'})", 4)
    if not chosen[-1].url:
        raise DownloadError("the coordinator serves no HTTP download URL; pass --http", 2)
    return public_key, chosen[-1].url


def _folder_url(http: str, run: str, round_number: int | None) -> str:
    return f"{http.rstrip('/')}/runs/{run}/checkpoints/{round_number if round_number is not None else 'latest'}"


@app.command("status")
def status(
    coordinator: str = typer.Option(..., "--coordinator", "-c", help=COORDINATOR_HELP),
    http: str | None = typer.Option(None, "--http", help="Base URL of the coordinator's HTTP port "
                                                          "(default: http://HOST:8080)."),
    state_dir: Path = typer.Option(Path.home() / ".omi", "--state-dir", envvar="OMI_HOME",
                                   help="Where the node's identity and token live."),
    identity: Path | None = typer.Option(None, "--identity", help="Ed25519 key (default: STATE_DIR/node_key.pem)."),
) -> None:
    """This node's identity, the runs it joined, and the credit the coordinator's ledger gives it."""
    import json as json_module
    import time
    import urllib.error
    import urllib.request

    import grpc
    from omi.protos import pb, rpc, signing
    from omi.protos.channels import KNOWN_FILENAME, CertificateRefused, open_channel, parse_target
    from omi.protos.tokens import TokenFile
    from rich.table import Table

    key_path = identity or state_dir / "node_key.pem"
    if not key_path.exists():
        console.print(f"[red]error:[/red] no node identity at {key_path}: this node never joined (omi-node join)")
        raise typer.Exit(2)
    node_id = signing.node_id(signing.public_bytes(signing.load_key(key_path)))
    console.print(f"node id  [bold]{node_id}[/bold]\nidentity {key_path}")
    token_path = state_dir / "token.bin"
    if token_path.exists():
        token = TokenFile(token_path)()
        left = token.expires_at_ms / 1000 - time.time()
        console.print(f"token    run {token.run_id}, peer {token.peer_id}, "
                      + (f"valid {left / 60:.0f} more minutes" if left > 0 else "expired"))
    base = (http or f"http://{parse_target(coordinator).address.rsplit(':', 1)[0]}:8080").rstrip("/")
    try:
        with open_channel(coordinator, known=state_dir / KNOWN_FILENAME) as channel:
            runs = rpc.CoordinatorStub(channel).ListRuns(pb.ListRunsRequest(), timeout=10).runs
    except grpc.RpcError as e:
        console.print(f"[red]error:[/red] coordinator {coordinator}: {e.code().name}: {e.details()}")
        raise typer.Exit(3) from None
    except CertificateRefused as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(5) from None
    table = Table("run", "round", "samples", "verified samples", "audits passed", "audits failed", "online")
    joined = 0
    for run in runs:
        try:
            with urllib.request.urlopen(f"{base}/api/runs/{run.run_id}/contributors", timeout=10) as response:
                contributors = json_module.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            console.print(f"[red]error:[/red] cannot read the ledger at {base}: {getattr(e, 'reason', e)} "
                          "(pass --http URL of the coordinator's HTTP port)")
            raise typer.Exit(3) from None
        mine = next((c for c in contributors if c.get("node_id") == node_id), None)
        if mine is None:
            continue
        joined += 1
        table.add_row(run.run_id, str(run.round), f"{mine.get('samples', 0):,}",
                      f"{mine.get('verified_samples', 0):,}", str(mine.get("audits_passed", 0)),
                      str(mine.get("audits_failed", 0)), "yes" if mine.get("online") else "no")
    if joined:
        console.print(table)
    else:
        console.print(f"no contributions in any of the coordinator's {len(runs)} runs yet")


@app.command("validate")
def validate(
    coordinator: str = typer.Option(..., "--coordinator", "-c", help=COORDINATOR_HELP),
    run: str = typer.Option("", "--run", help="Run to validate (default: the coordinator's only running one)."),
    state_dir: Path = typer.Option(Path.home() / ".omi" / "validator", "--state-dir",
                                   help="Identity, swarm keys and token live here."),
    token_file: Path | None = typer.Option(None, "--token-file",
                                           help="A coordinator-minted token (the built-in validator)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the swarm peer listens on."),
    threads: int = typer.Option(0, "--threads", min=0, help="torch CPU threads (0: torch's default)."),
    max_tasks: int = typer.Option(0, "--max-tasks", min=0, help="Stop after this many verdicts (0: never)."),
) -> None:
    """Follow a run's swarm, recompute audited micro-batches and report signed verdicts until Ctrl-C."""
    from omi.node.session import NodeError
    from omi.node.validator import Validator, ValidatorConfig
    from omi.swarm.signals import install_stop_signals

    validator = Validator(ValidatorConfig(coordinator=coordinator, run_id=run, state_dir=state_dir,
                                          token_file=token_file, host=host, threads=threads, max_tasks=max_tasks))
    install_stop_signals(validator.stop)
    try:
        verdicts = validator.run()
    except NodeError as e:
        logger.error("%s", e)
        raise typer.Exit(e.exit_code) from None
    finally:
        validator.shutdown()
    logger.info("done: %d verdicts reported", verdicts)
