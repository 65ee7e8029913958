"""Model registry: a model name in the RunSpec -> the diffusers model the swarm trains and its scheduler.

Two families: unconditional pixel-space UNets trained with DDPM (``unet-*``, configs below), and text-to-image
latent transformers trained with flow matching (``sana-*``, :mod:`omi.models.text_to_image`). Nothing is ever
downloaded: the trained model is built from config with a seeded initialisation, so every volunteer that builds
``unet-digits-16`` with the same seed holds bitwise the same parameters.

>>> model, scheduler = build_model("unet-digits-16")
>>> model.config.sample_size, model.config.in_channels, scheduler.config.prediction_type
(16, 1, 'epsilon')
>>> model_info("unet-digits-16").parameters
947777
>>> model_info("sana-1600m").parameters > 1_600_000_000
True
>>> build_model("unet-huge")
Traceback (most recent call last):
...
ValueError: unknown model 'unet-huge' (known: unet-digits-16, unet-32, unet-64, sana-digits, sana-600m, sana-1600m)
"""

import logging
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from omi.models import flow, text_to_image
from omi.protos import pb

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")

# name -> UNet2DModel config. Everything not given is diffusers' default (SiLU, GroupNorm, sinusoidal time embedding).
_CONFIGS: dict[str, dict[str, Any]] = {
    # ~0.95 M parameters: trains on a 2-core CPU at a few hundred samples/s; attention only at 4x4 where it is cheap.
    "unet-digits-16": dict(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(32, 48, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
    # ~35.7 M parameters: the DDPM CIFAR-10 architecture (Ho et al. 2020), attention at 16x16.
    "unet-32": dict(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
    # ~71.4 M parameters: five resolutions 64 -> 4, attention at 8x8.
    "unet-64": dict(
        sample_size=64, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 128, 256, 256, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
}

KNOWN_MODELS: tuple[str, ...] = tuple(_CONFIGS) + tuple(text_to_image.CONFIGS)


@dataclass(frozen=True)
class ModelInfo:
    """What a registry model weighs."""

    name: str
    parameters: int  # number of trainable parameters
    bytes: int  # size of the float32 parameters
    sample_size: int  # side of the square images it takes (a latent model: of the images its latents decode to)
    channels: int  # image channels (1 grayscale, 3 RGB)


def _config(name: str) -> dict[str, Any]:
    if name not in _CONFIGS or name in text_to_image.CONFIGS:
        raise ValueError(f"unknown model '{name}' (known: {', '.join(KNOWN_MODELS)})")
    return _CONFIGS[name]


def build_model(
    name: str, *, prediction_type: str | None = None, num_train_timesteps: int = 1000, seed: int = 0
) -> tuple[torch.nn.Module, Any]:
    """Build the model the swarm trains and its training scheduler for a registry name.

    :param name: one of ``KNOWN_MODELS``
    :param prediction_type: what the model predicts: a UNet ``epsilon`` (the noise, its default) or
        ``v_prediction``; a text-to-image transformer ``flow`` (its only one)
    :param num_train_timesteps: length of the noise schedule (a transformer sees ``sigma * num_train_timesteps``)
    :param seed: seeds the parameter initialisation (the global torch RNG is left untouched)
    """
    if name in text_to_image.CONFIGS:
        if prediction_type not in (None, flow.PREDICTION_TYPE):
            raise ValueError(f"'{name}' is trained with prediction_type '{flow.PREDICTION_TYPE}' "
                             f"(flow matching), not '{prediction_type}'")
        return text_to_image.build_transformer(name, num_train_timesteps=num_train_timesteps, seed=seed)
    prediction_type = prediction_type or "epsilon"
    config = _config(name)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type '{prediction_type}' (known: {', '.join(PREDICTION_TYPES)})")
    if num_train_timesteps <= 0:
        raise ValueError(f"num_train_timesteps must be > 0, got {num_train_timesteps}")
    # fork_rng: the same seed gives the same parameters without disturbing the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet2DModel(**config)
    scheduler = DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule="linear", prediction_type=prediction_type
    )
    return model, scheduler


def build_for_spec(spec: pb.RunSpec) -> tuple[torch.nn.Module, Any]:
    """The model and scheduler of a run, as every peer of it builds them (same parameters from the same seed)."""
    training = spec.training
    return build_model(spec.model, prediction_type=training.prediction_type,
                       num_train_timesteps=training.num_train_timesteps, seed=training.seed)


@cache
def model_info(name: str) -> ModelInfo:
    """Parameter count and size of a registry model, measured on the meta device (no memory allocated)."""
    if name in text_to_image.CONFIGS:
        config = text_to_image.latent_config(name)
        model = text_to_image.meta_transformer(name)
        sample_size, channels = config.resolution, config.channels
    else:
        config = _config(name)
        with torch.device("meta"):
            model = UNet2DModel(**config)
        sample_size, channels = config["sample_size"], config["in_channels"]
    params = [p for p in model.parameters() if p.requires_grad]
    return ModelInfo(
        name=name,
        parameters=sum(p.numel() for p in params),
        bytes=sum(p.numel() * p.element_size() for p in params),
        sample_size=sample_size,
        channels=channels,
    )
