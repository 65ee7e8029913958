"""The flow-matching objective of the text-to-image runs (rectified flow, as SD3 and Sana train) and its micro-batch.

Torch only: the micro-batch function (:mod:`omi.models.microbatch`) computes this loss for every text-to-image
step and audit, and a process that trains or audits a UNet run should not load the Sana pipeline's classes
(diffusers' pipelines and transformers cost seconds of CPU at every start). The model and scheduler it is called
with are :mod:`omi.models.text_to_image`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel

PREDICTION_TYPE = "flow"  # the transformer predicts the velocity noise - x0 of the straight path between them
CAPTION_DROPOUT = 0.1  # share of training samples whose caption is swapped for the empty prompt (for guidance)


@dataclass
class LatentBatch:
    """A micro-batch of a text-to-image run: latents and caption embeddings, padded to its longest caption.

    :param latents: ``(N, C, h, w)`` scaled latents
    :param embeds: ``(N, L, D)`` caption embeddings, zero past each caption's length
    :param mask: ``(N, L)`` 1 for a caption token, 0 for padding
    :param null: ``(L0, D)`` the empty prompt's embedding, used for the samples whose caption is dropped
    """

    latents: torch.Tensor
    embeds: torch.Tensor
    mask: torch.Tensor
    null: torch.Tensor

    @classmethod
    def collate(cls, latents: torch.Tensor, captions: list[torch.Tensor], null: torch.Tensor) -> LatentBatch:
        if len(captions) != latents.shape[0] or not captions:
            raise ValueError(f"{latents.shape[0]} latents and {len(captions)} captions in one micro-batch")
        width = null.shape[-1]
        length = max(max(c.shape[0] for c in captions), null.shape[0])
        embeds = torch.zeros(len(captions), length, width, dtype=torch.float32)
        mask = torch.zeros(len(captions), length, dtype=torch.int64)
        for i, caption in enumerate(captions):
            if caption.dim() != 2 or caption.shape[-1] != width or not caption.shape[0]:
                raise ValueError(f"caption {i}: expected (tokens, {width}), got {tuple(caption.shape)}")
            embeds[i, :caption.shape[0]] = caption
            mask[i, :caption.shape[0]] = 1
        return cls(latents=latents.float(), embeds=embeds, mask=mask, null=null.float())

    def __len__(self) -> int:
        return self.latents.shape[0]


def flow_matching_loss(model: SanaTransformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler,
                       batch: LatentBatch, generator: torch.Generator) -> torch.Tensor:
    """The rectified-flow loss of one micro-batch (SD3, Sana): ``x_t = (1 - σ) x0 + σ ε``, target ``ε - x0``.

    Randomness, all from ``generator`` (CPU) in this order: the noise (shape of the latents), one logit-normal
    draw per sample (σ = sigmoid(N(0, 1)), then the scheduler's shift, as SD3 trains), one uniform draw per sample
    for caption dropout (:data:`CAPTION_DROPOUT`: that sample sees the empty prompt, so guidance has an
    unconditional model). On CUDA the forward runs under bfloat16 autocast; the loss is float32.
    """
    params = next(model.parameters())
    device, dtype = params.device, params.dtype
    n = len(batch)
    noise = torch.randn(batch.latents.shape, generator=generator, dtype=torch.float32)
    sigmas = torch.sigmoid(torch.randn(n, generator=generator, dtype=torch.float32))
    shift = float(scheduler.config.shift)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    dropped = torch.rand(n, generator=generator) < CAPTION_DROPOUT

    embeds, mask = batch.embeds.clone(), batch.mask.clone()
    if dropped.any():
        embeds[dropped] = 0
        mask[dropped] = 0
        embeds[dropped, :batch.null.shape[0]] = batch.null
        mask[dropped, :batch.null.shape[0]] = 1
    latents, noise, sigmas = batch.latents.to(device, dtype), noise.to(device, dtype), sigmas.to(device, dtype)
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    target = noise - latents
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        prediction = model(noisy, encoder_hidden_states=embeds.to(device, dtype),
                           encoder_attention_mask=mask.to(device),
                           timestep=sigmas * scheduler.config.num_train_timesteps).sample
    return torch.nn.functional.mse_loss(prediction.float(), target.float())
