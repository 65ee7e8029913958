"""Sampling previews with DDIM, image grids, and checkpoints in diffusers format.

A checkpoint written by :func:`save_pretrained` is a plain ``DDPMPipeline`` folder (``model_index.json``,
``unet/`` in safetensors, ``scheduler/``), so ``diffusers.DDPMPipeline.from_pretrained(dir)`` loads and runs it
with no code of ours.

>>> from omi.models.registry import build_model
>>> model, scheduler = build_model("unet-digits-16")
>>> images = generate(model, scheduler, n=2, steps=2, seed=0)
>>> tuple(images.shape), make_grid(images, nrow=2).size
((2, 1, 16, 16), (38, 20))
"""

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

logger = logging.getLogger(__name__)


@torch.inference_mode()
def generate(
    model: UNet2DModel,
    scheduler_config_or_scheduler: Any,
    n: int,
    steps: int = 50,
    seed: int = 0,
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """Draw ``n`` images with deterministic DDIM (eta 0) in ``steps`` steps: float32 ``(n, C, H, W)`` in [-1, 1], CPU.

    :param model: the UNet
    :param scheduler_config_or_scheduler: the training scheduler or its config (noise schedule, prediction type)
    :param n: number of images
    :param steps: DDIM steps (50 is plenty for previews)
    :param seed: seeds the initial noise (a CPU generator, so previews match across devices up to float error)
    :param batch_size: images per forward pass
    """
    if n <= 0 or steps <= 0:
        raise ValueError(f"n and steps must be > 0, got n={n}, steps={steps}")
    config = getattr(scheduler_config_or_scheduler, "config", scheduler_config_or_scheduler)
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    shape = (n, model.config.in_channels, model.config.sample_size, model.config.sample_size)
    # 1. start from pure noise, drawn on the CPU so the same seed gives the same start on any device
    images = torch.randn(shape, generator=generator).to(device)
    try:
        for t in scheduler.timesteps:
            # 2. predict the noise (or v) of every image, in chunks of batch_size
            output = torch.cat([model(chunk, t).sample for chunk in images.split(batch_size)])
            # 3. step the scheduler back to the previous timestep (eta=0: no fresh noise)
            images = scheduler.step(output, t, images, eta=0.0).prev_sample
    finally:
        model.train(was_training)
    return images.clamp(-1, 1).float().cpu()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] ``(N, C, H, W)`` -> uint8 ``(N, H, W, C)``."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, *, padding: int = 2, scale: int = 1) -> Image.Image:
    """Tile images (``(N, C, H, W)`` in [-1, 1]) into one picture, ``nrow`` per row, on a black background.

    :param nrow: images per row (default: a square-ish grid)
    :param padding: pixels between images
    :param scale: nearest-neighbour upscaling factor, to make 16x16 digits visible
    """
    n, channels, height, width = images.shape
    nrow = nrow or grid_columns(n)
    rows = math.ceil(n / nrow)
    pixels = to_uint8(images)
    grid = np.zeros((rows * (height + padding) + padding, nrow * (width + padding) + padding, channels), np.uint8)
    for i in range(n):
        top, left = padding + (i // nrow) * (height + padding), padding + (i % nrow) * (width + padding)
        grid[top:top + height, left:left + width] = pixels[i]
    picture = Image.fromarray(grid[..., 0] if channels == 1 else grid, mode="L" if channels == 1 else "RGB")
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    return picture


def grid_columns(n: int) -> int:
    """Images per row of a square-ish grid of ``n``: :func:`make_grid`'s default."""
    return math.ceil(math.sqrt(n))


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save a preview grid PNG, upscaled so small images stay visible (cells of at least 64 pixels)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, nrow, scale=max(1, 64 // images.shape[-1])).save(path, format="PNG")
    return path


def save_pretrained(model: UNet2DModel, scheduler: DDPMScheduler, directory: str | Path) -> Path:
    """Write a stock ``DDPMPipeline`` folder: ``model_index.json``, ``unet/`` (safetensors), ``scheduler/``."""
    directory = Path(directory)
    DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(directory, safe_serialization=True)
    logger.info("saved diffusers checkpoint to %s", directory)
    return directory


def load_pretrained(directory: str | Path, *, device: str | torch.device = "cpu") -> tuple[UNet2DModel, DDPMScheduler]:
    """Load a folder written by :func:`save_pretrained` (or any DDPMPipeline folder)."""
    directory = Path(directory)
    if not (directory / "unet").is_dir():
        raise FileNotFoundError(f"{directory} is not a diffusers DDPMPipeline folder (no unet/)")
    model = UNet2DModel.from_pretrained(directory, subfolder="unet").to(device)
    scheduler = DDPMScheduler.from_pretrained(directory, subfolder="scheduler")
    return model, scheduler


def save_model(model: torch.nn.Module, scheduler: Any, directory: str | Path, *, parts=None) -> Path:
    """A run's model as a stock diffusers folder: a ``DDPMPipeline`` (a UNet), or a ``SanaPipeline`` with the data
    set's frozen ``parts`` (a text-to-image transformer)."""
    if parts is None:
        return save_pretrained(model, scheduler, directory)
    from omi.models.text_to_image import save_text_to_image

    return save_text_to_image(model, scheduler, parts, directory)


def load_model(directory: str | Path, *, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any]:
    """The trained model and scheduler of a folder :func:`save_model` wrote (a UNet's or a transformer's)."""
    if (Path(directory) / "transformer").is_dir():
        from omi.models.text_to_image import load_text_to_image

        model, scheduler, _ = load_text_to_image(directory, device=device)
        return model, scheduler
    return load_pretrained(directory, device=device)


def draw(model: torch.nn.Module, scheduler: Any, n: int, steps: int, seed: int, *, parts=None,
         prompts: tuple[str, ...] | list[str] = ()) -> torch.Tensor:
    """``n`` preview images: DDIM samples of a UNet, or a text-to-image model's samples of ``prompts`` in turn."""
    if parts is None:
        return generate(model, scheduler, n, steps, seed)
    from omi.models.text_to_image import generate_from_prompts

    if not prompts:
        raise ValueError("a text-to-image model draws from prompts: none given")
    return generate_from_prompts(model, scheduler, parts, cell_prompts(prompts, n), steps=steps, seed=seed)


def cell_prompts(prompts: tuple[str, ...] | list[str], n: int) -> list[str]:
    """The prompt of each of ``n`` preview images, in grid order: ``prompts`` in turn (what :func:`draw` draws).

    >>> cell_prompts(("a zero", "a one", "a two"), 4)
    ['a zero', 'a one', 'a two', 'a zero']
    """
    return [prompts[i % len(prompts)] for i in range(n)]


def run_drawing(source) -> tuple[Any, tuple[str, ...]]:
    """The frozen parts and preview prompts of a run's data source: ``(None, ())`` for image sources."""
    from omi.models.latent_source import LatentShardSource

    if not isinstance(source, LatentShardSource):
        return None, ()
    return source.frozen_parts(), tuple(source.manifest.preview_prompts)
