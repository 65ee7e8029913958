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
) -> None:
    """Train a RunSpec in this process, without a swarm: the baseline swarm training is compared against."""
    # Imported here so `omi-node --help` and the light commands stay fast (torch and diffusers take seconds).
    from omi.models.train_local import train_local as run_train_local
    from omi.protos.runspec import RunSpecError, load_runspec

    try:
        spec = load_runspec(run)
        result = run_train_local(spec, samples, device=device, out_dir=out, batch_size=batch_size)
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
