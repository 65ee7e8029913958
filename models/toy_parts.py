"""A toy model's frozen parts, made here: built from config, the autoencoder fitted to the digits, saved to a folder."""

from pathlib import Path

import torch
from omi.models import text_to_image as t2i
from omi.models.prepare_input import PreparationError
from omi.models.quality import one_thread


def save_frozen_parts(parts: t2i.FrozenParts, directory: str | Path) -> Path:
    """Write the parts as a Sana pipeline folder would hold them (``vae/``, ``text_encoder/``, ``tokenizer/``)."""
    directory = Path(directory)
    parts.vae.save_pretrained(directory / "vae", safe_serialization=True)
    parts.text_encoder.save_pretrained(directory / "text_encoder", safe_serialization=True)
    parts.tokenizer.save_pretrained(directory / "tokenizer")
    return directory


def fit_toy_autoencoder(parts: t2i.FrozenParts, images: torch.Tensor, *, steps: int, seed: int = 0,
                        batch_size: int = 64, lr: float = 2e-3) -> float:
    """Fit a toy model's random autoencoder to reconstruct ``images`` ([-1, 1]), then scale its latents to unit
    variance (``scaling_factor``, as Stable Diffusion's and Sana's autoencoders carry). Returns the last batch's
    reconstruction MSE. A real model's autoencoder is a released one, never fitted here.

    Seeded (batches from a CPU generator), so the same images, steps and thread count give the same weights.
    """
    if steps <= 0:
        raise PreparationError(f"autoencoder steps must be > 0, got {steps}")
    with one_thread():  # a toy: one thread is fastest, two wait on each other on a busy machine
        return _fit(parts.vae, images, steps=steps, seed=seed, batch_size=batch_size, lr=lr)


def _fit(vae, images: torch.Tensor, *, steps: int, seed: int, batch_size: int, lr: float) -> float:
    vae = vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        loss = torch.nn.functional.mse_loss(vae.decode(vae.encode(batch).latent).sample, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        std = torch.cat([vae.encode(chunk).latent for chunk in images.split(256)]).std()
    vae.register_to_config(scaling_factor=float(1 / std))
    return float(loss.detach())


def make_toy_parts(model: str, directory: str | Path, *, steps: int = 200, seed: int = 0) -> tuple[Path, float]:
    """A toy model's frozen parts, built from config with its autoencoder fitted to the digits, saved to a folder
    ``--parts`` can name. Returns the folder and the autoencoder's last reconstruction MSE."""
    from omi.models.data import DigitsSource

    config = t2i.latent_config(model)
    parts = t2i.build_frozen_parts(model, seed=seed)
    images = DigitsSource(shard_size=1, resolution=config.resolution, channels=config.channels).images
    mse = fit_toy_autoencoder(parts, images, steps=steps, seed=seed)
    return save_frozen_parts(parts, directory), mse
