"""The ``omi-node`` command line: one function per command; each parses its arguments and calls the domain code.

    omi-node train-local --run examples/runs/digits.toml --samples 20000 --out runs/digits-local
    omi-node sample runs/digits-local --n 16 --out grid.png
"""

import logging
from pathlib import Path

import typer
from rich import get_console
from rich.logging import RichHandler

app = typer.Typer(help="A volunteer node of omi-swarm.", no_args_is_help=True, add_completion=False)
console = get_console()  # the one rich progress bars and log lines share, so they do not garble each other
logger = logging.getLogger(__name__)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])


@app.command("train-local")
def train_local(
    run: Path = typer.Option(..., "--run", help="RunSpec TOML file."),
    samples: int = typer.Option(..., "--samples", min=1, help="Samples to train on."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    out: Path | None = typer.Option(None, "--out", help="Save the diffusers checkpoint and preview.png here."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1,
                                          help="Samples per optimizer step (default: the RunSpec's target)."),
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
    checkpoint: Path = typer.Argument(..., help="A diffusers DDPMPipeline folder (e.g. from train-local --out)."),
    n: int = typer.Option(16, "--n", min=1, help="Number of images."),
    out: Path = typer.Option(Path("grid.png"), "--out", help="PNG file for the image grid."),
    steps: int = typer.Option(50, "--steps", min=1, help="DDIM steps."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial noise."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Generate images from a checkpoint and save them as one grid PNG."""
    from omi.models.device import pick_device
    from omi.models.sampling import generate, load_pretrained, save_grid

    try:
        model, scheduler = load_pretrained(checkpoint, device=pick_device(device))
    except (OSError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    images = generate(model, scheduler, n, steps, seed)
    save_grid(images, out)
    console.print(f"{n} images from {checkpoint} -> {out}")


@app.command("join")
def join(
    coordinator: str = typer.Option(..., "--coordinator", "-c", help="HOST:PORT of the coordinator's gRPC API."),
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
    max_epochs: int = typer.Option(0, "--max-epochs", min=0, help="Leave after this many contributions (0: never)."),
    threads: int = typer.Option(0, "--threads", min=0, help="torch CPU threads (0: torch's default)."),
    save: Path | None = typer.Option(None, "--save", help="On leaving, save the model here (diffusers format)."),
    connect_attempts: int = typer.Option(6, "--connect-attempts", min=1,
                                         help="Tries to reach the coordinator (waits 1, 2, 4, … s between)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live view; log lines only."),
    log_json: bool = typer.Option(False, "--log-json", help="Log one JSON object per line (implies --quiet)."),
) -> None:
    """Join a training run as a volunteer: train in the swarm and report contributions until Ctrl-C."""
    from omi.node.trainer import NodeConfig, NodeError, VolunteerNode, install_stop_signals
    from omi.node.view import JsonFormatter, LiveView

    if log_json:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    config = NodeConfig(coordinator=coordinator, run_id=run, device=device, batch_size=batch_size,
                        state_dir=state_dir, identity=identity, display_name=name, host=host, port=port,
                        announce=announce, client_mode=client_mode, max_epochs=max_epochs, threads=threads,
                        save_dir=save, connect_attempts=connect_attempts)
    view = None if (quiet or log_json or not console.is_terminal) else LiveView(console)
    node = VolunteerNode(config, on_status=view.update if view else None)
    install_stop_signals(node)
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
