"""The ``omi-data`` command line: the data working group's tools, one function per command.

    omi-data toy-parts --out data/sana-digits-parts
    omi-data prepare builtin:digits --parts data/sana-digits-parts --out data/digits-captioned
    omi-data prepare ~/pd12m-sample --parts Efficient-Large-Model/Sana_600M_1024px_diffusers --model sana-600m \\
        --out data/pd12m --card-source "PD12M" --card-license-terms "CC0 / public domain"
    omi-data show data/digits-captioned
"""

import logging
from pathlib import Path

import typer
from rich import get_console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(help="Prepare licensed image-caption data for omi-swarm's text-to-image runs.",
                  no_args_is_help=True, add_completion=False)
console = get_console()
logger = logging.getLogger(__name__)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if console.is_terminal:
        logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command("toy-parts")
def toy_parts(
    out: Path = typer.Option(..., "--out", help="Folder for vae/, text_encoder/ and tokenizer/."),
    model: str = typer.Option("sana-digits", "--model", help="A toy text-to-image model of the registry."),
    steps: int = typer.Option(200, "--steps", min=1, help="Steps fitting the autoencoder to the digits."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seeds the parts' initialisation and the fitting."),
) -> None:
    """Build a toy model's frozen parts from config (nothing downloaded) and fit its autoencoder to the digits."""
    from omi.models.toy_parts import make_toy_parts

    try:
        with console.status(f"fitting {model}'s autoencoder to the digits ({steps} steps)"):
            folder, mse = make_toy_parts(model, out, steps=steps, seed=seed)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    console.print(f"{model} parts -> {folder} (autoencoder reconstruction MSE {mse:.4f})")


@app.command("prepare")
def prepare(
    source: str = typer.Argument(..., help="builtin:digits, an image folder (NAME.png + NAME.json/.txt) or tars."),
    parts: str = typer.Option(..., "--parts", help="Frozen parts: a folder (vae/, text_encoder/, tokenizer/) or a "
                              "hub id (ORG/NAME or ORG/NAME@REVISION, fetched into the hub cache)."),
    out: Path = typer.Option(..., "--out", help="Folder for the shards, manifest.json and DATA_CARD.md."),
    model: str = typer.Option("sana-digits", "--model", help="The text-to-image model the data is for."),
    name: str = typer.Option("", "--name", help="Data set name (default: the source's)."),
    shard_size: int = typer.Option(256, "--shard-size", min=1, help="Samples per shard."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Samples encoded together."),
    license_id: str | None = typer.Option(None, "--license", help="Licence of samples whose metadata names none."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (encoding)."),
    threads: int = typer.Option(0, "--threads", min=0, help="torch CPU threads (0: torch's default)."),
    card_source: str = typer.Option("", "--card-source", help="Data card: where the images come from."),
    card_license_terms: str = typer.Option("", "--card-license-terms", help="Data card: what the licences allow."),
    card_filtering: str = typer.Option("", "--card-filtering", help="Data card: what was left out and why."),
    card_caption_origin: str = typer.Option("", "--card-caption-origin", help="Data card: who wrote the captions."),
) -> None:
    """Encode licensed image-caption samples into latent shards with a manifest; resumes an interrupted run."""
    import torch
    from omi.models.device import pick_device
    from omi.models.prepare import prepare as run_prepare
    from omi.models.prepare_input import PreparationError
    from omi.protos.dataset import DataCard

    if threads:
        torch.set_num_threads(threads)
    card = None
    if card_source or card_license_terms:
        card = DataCard(source=card_source or "not stated", license_terms=card_license_terms or "not stated",
                        filtering=card_filtering, caption_origin=card_caption_origin)
    columns = (TextColumn("encoding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("encoding", total=None)
            manifest = run_prepare(source, parts, out, model=model, name=name, card=card, shard_size=shard_size,
                                   batch_size=batch_size, default_license=license_id, device=pick_device(device),
                                   on_sample=lambda n: progress.update(task, completed=n))
    except (PreparationError, ValueError, OSError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    refused = sum(manifest.refused.values())
    console.print(f"{manifest.name}: {manifest.samples:,} samples in {len(manifest.shards)} shards -> {out} "
                  f"({refused:,} refused{': ' + str(manifest.refused) if refused else ''})")


@app.command("show")
def show(folder: Path = typer.Argument(..., help="A prepared data set (or its manifest.json).")) -> None:
    """Print a prepared data set's data card and licence tally."""
    from omi.models.data_card import data_card_markdown
    from omi.protos.dataset import ManifestError, read_manifest

    try:
        manifest = read_manifest(folder)
    except ManifestError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    console.print(data_card_markdown(manifest), markup=False, highlight=False)
