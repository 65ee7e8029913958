"""The one micro-batch function: loss and gradient from (parameters, samples, seed), with its record and sketch.

The node trainer, the validator and the checkpointer all call :func:`compute_micro_batch`; nothing else in the
project draws diffusion noise or timesteps for training. Noise and timesteps come from a CPU ``torch.Generator``
seeded with :func:`micro_batch_seed` (run, round, node, micro-batch index), so anyone holding the same parameters
and the same samples recomputes the same gradient: bitwise on the same CPU with the same torch thread count,
within :class:`omi.models.replay.Tolerances` elsewhere.

>>> import torch
>>> from omi.models.registry import build_model
>>> model, scheduler = build_model("unet-digits-16")
>>> sketch = GradientSketch(model, size=256, seed=0)
>>> batch = torch.zeros(2, 1, 16, 16)
>>> seed = micro_batch_seed(0, "digits", round_number=0, node_id="node-a", index=0)
>>> record = compute_micro_batch(model, scheduler, batch, seed, prediction_type="epsilon", sketch=sketch)
>>> record.samples, record.sketch.shape, record.grad_norm > 0
(2, torch.Size([256]), True)
"""

from __future__ import annotations

import hashlib
import logging
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from omi.models.flow import PREDICTION_TYPE as FLOW_PREDICTION
from omi.models.flow import LatentBatch, flow_matching_loss

if TYPE_CHECKING:  # the schedulers are passed in; loading diffusers here would cost every importer seconds
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

logger = logging.getLogger(__name__)


def micro_batch_seed(base_seed: int, run_id: str, round_number: int, node_id: str, index: int) -> int:
    """The 63-bit seed of one micro-batch's noise and timesteps, hash-derived so nearby inputs give unrelated seeds.

    >>> micro_batch_seed(0, "digits", 0, "node-a", 0) == micro_batch_seed(0, "digits", 0, "node-a", 1)
    False
    """
    text = f"omi-micro-batch-v1|{int(base_seed)}|{run_id}|{int(round_number)}|{node_id}|{int(index)}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2**63 - 1)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters a gradient covers, in the model's fixed definition order."""
    return [p for p in model.parameters() if p.requires_grad]


def params_hash(model: torch.nn.Module) -> bytes:
    """SHA-256 over every parameter in definition order, with its name, dtype and shape.

    Two nodes agree on this hash exactly when they hold bitwise the same parameters.
    """
    return named_tensors_hash(model.named_parameters())


def named_tensors_hash(named: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """:func:`params_hash` of ``(name, tensor)`` pairs given in the model's parameter order (e.g. a held state)."""
    digest = hashlib.sha256(b"omi-params-v1")
    for name, param in named:
        tensor = param.detach().to("cpu").contiguous()
        header = f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode()
        digest.update(struct.pack("<I", len(header)) + header)
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.digest()


class GradientSketch:
    """A seeded linear sketch of the flattened gradient: a sparse ±1 random projection to ``size`` numbers.

    Coordinate ``i`` of the flat gradient goes, with sign ``r[i // size]``, into bucket ``i % size``; the row
    signs ``r`` (one per ``size`` coordinates) come from a CPU generator seeded with ``seed``. Coordinates sharing
    a bucket sit in different rows, so their signs are independent and this is a CountSketch: linear
    (sketch(g1 + g2) = sketch(g1) + sketch(g2)), so an accumulated gradient's sketch is the sum of the
    micro-batch sketches, and unbiased for squared distances, so ``||sketch(g) - sketch(g')||`` measures how far a
    claimed gradient is from the true one. Computing it is a matrix-vector product over the gradient viewed as
    rows of ``size`` (one memory pass; large tensors in place, small ones concatenated); it keeps 4 bytes per
    ``size`` parameters.

    :param model_or_num_params: the model whose gradients are sketched, or the length of the flat gradient
    :param size: number of buckets (the RunSpec's ``verification.sketch_size``)
    :param seed: seeds the signs; every node and validator of a run uses the same one

    >>> s = GradientSketch(10, size=4, seed=0)
    >>> g = torch.arange(10, dtype=torch.float32)
    >>> torch.allclose(s.of_vector(g + g), 2 * s.of_vector(g))
    True
    """

    def __init__(self, model_or_num_params: torch.nn.Module | int, size: int, seed: int):
        if isinstance(model_or_num_params, torch.nn.Module):
            num_params = sum(p.numel() for p in trainable_parameters(model_or_num_params))
        else:
            num_params = int(model_or_num_params)
        if size <= 0 or num_params <= 0:
            raise ValueError(f"sketch size and parameter count must be > 0, got size={size}, params={num_params}")
        self.size, self.seed, self.num_params = int(size), int(seed), num_params
        rows = -(-num_params // self.size)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self._signs = (torch.randint(0, 2, (rows,), generator=generator) * 2 - 1).to(torch.float32)

    def _add(self, out: torch.Tensor, values: torch.Tensor, offset: int) -> None:
        """Add the sketch of ``values``, sitting at ``offset`` in the flat gradient, into ``out``."""
        size, signs, n = self.size, self._signs, values.numel()
        head = min((-offset) % size, n)  # up to the next row boundary
        if head:
            out[offset % size:offset % size + head] += values[:head] * signs[offset // size]
        row, rows = (offset + head) // size, (n - head) // size
        if rows:
            out += values[head:head + rows * size].view(rows, size).T @ signs[row:row + rows]
        tail = values[head + rows * size:]
        if tail.numel():
            out[:tail.numel()] += tail * signs[row + rows]

    def of_vector(self, flat: torch.Tensor) -> torch.Tensor:
        """Sketch of a flat gradient vector of ``num_params`` numbers, as ``size`` float32 numbers on the CPU."""
        if flat.dim() != 1 or flat.numel() != self.num_params:
            raise ValueError(f"expected a flat vector of {self.num_params} numbers, got shape {tuple(flat.shape)}")
        return self.of_segments([(0, flat.to(torch.float32))])

    def of_grads(self, grads: list[torch.Tensor | None], params: list[torch.Tensor]) -> torch.Tensor:
        """Sketch of per-parameter gradients (``None`` counts as zero) laid end to end in the order of ``params``."""
        return self.of_segments(gradient_segments(grads, params))

    def of_segments(self, segments: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Sketch of a gradient given as ``(offset, flat float32 values)`` pieces (see :func:`gradient_segments`)."""
        if not segments:
            return torch.zeros(self.size, dtype=torch.float32)
        device = segments[0][1].device
        if self._signs.device != device:
            self._signs = self._signs.to(device)
        out = torch.zeros(self.size, dtype=torch.float32, device=device)
        for offset, values in segments:
            if offset + values.numel() > self.num_params:
                raise ValueError(f"gradient piece at {offset} runs past the sketch's {self.num_params} numbers")
            self._add(out, values, offset)
        return out.cpu()

    def of_model_grads(self, model: torch.nn.Module) -> torch.Tensor:
        """Sketch of the gradient currently held in the model's ``param.grad``."""
        params = trainable_parameters(model)
        return self.of_grads([p.grad for p in params], params)


SMALL_TENSOR = 1 << 16  # gradients smaller than this are concatenated; larger ones are used in place


def gradient_segments(grads: list[torch.Tensor | None], params: list[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    """The gradient as ``(offset in the flat gradient, flat float32 values)`` pieces, ``None`` grads left out.

    Runs of small tensors are concatenated (one op instead of hundreds of tiny ones), large tensors are viewed in
    place (no copy of the bulk of the gradient): both keep the sketch and norm cheap for tiny and big models.
    """
    segments: list[tuple[int, torch.Tensor]] = []
    run: list[torch.Tensor] = []
    run_start = offset = 0

    def flush() -> None:
        if run:
            segments.append((run_start, torch.cat(run).to(torch.float32) if len(run) > 1 else run[0].to(torch.float32)))
            run.clear()

    for grad, param in zip(grads, params, strict=True):
        if grad is None:
            flush()
        elif grad.numel() >= SMALL_TENSOR:
            flush()
            segments.append((offset, grad.detach().reshape(-1).to(torch.float32)))
        else:
            if not run:
                run_start = offset
            run.append(grad.detach().reshape(-1))
        offset += param.numel()
    flush()
    return segments


def flatten_grads(grads: list[torch.Tensor | None], params: list[torch.Tensor]) -> torch.Tensor:
    """One flat float32 vector of the gradients, zeros where a parameter got none."""
    pairs = zip(grads, params, strict=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32) for g, p in pairs])


@dataclass
class MicroBatchRecord:
    """What a node records about one micro-batch: enough for a validator to check it after recomputing."""

    index: int  # micro-batch index within the node's round
    samples: int  # number of samples in the micro-batch
    loss: float  # mean DDPM loss over the micro-batch
    grad_norm: float  # L2 norm of this micro-batch's own gradient
    sketch: torch.Tensor  # float32 GradientSketch of this micro-batch's own gradient (empty if no sketch)


def diffusion_target(
    scheduler: DDPMScheduler, samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the UNet is trained to predict: the noise (epsilon) or the velocity (v-prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(samples, noise, timesteps)
    raise ValueError(f"unknown prediction_type '{prediction_type}' (known: epsilon, v_prediction)")


def ddpm_loss(model: torch.nn.Module, scheduler: DDPMScheduler, batch: torch.Tensor, generator: torch.Generator,
              prediction_type: str) -> torch.Tensor:
    """The DDPM loss of one micro-batch of clean images ``(N, C, H, W)`` in [-1, 1].

    Randomness, from ``generator`` (CPU) in this order: the noise (shape of ``batch``, standard normal), then the
    timesteps (uniform in ``[0, num_train_timesteps)``); both are then moved to the model's device (and the noise
    cast to the model's dtype).
    """
    assert batch.dim() == 4, f"a micro-batch is (N, C, H, W), got shape {tuple(batch.shape)}"
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    noise = torch.randn(batch.shape, generator=generator, dtype=torch.float32)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch.shape[0],), generator=generator)
    samples, noise, timesteps = batch.to(device, dtype), noise.to(device, dtype), timesteps.to(device)

    noisy = scheduler.add_noise(samples, noise, timesteps)
    target = diffusion_target(scheduler, samples, noise, timesteps, prediction_type)
    prediction = model(noisy, timesteps).sample
    return F.mse_loss(prediction.float(), target.float())


def compute_micro_batch(
    model: torch.nn.Module,
    scheduler: DDPMScheduler | FlowMatchEulerDiscreteScheduler,
    batch: torch.Tensor | LatentBatch,
    seed: int,
    *,
    prediction_type: str,
    sketch: GradientSketch | None,
    index: int = 0,
) -> MicroBatchRecord:
    """Forward and backward of one micro-batch's loss; adds its gradient to ``param.grad``.

    Gradient semantics: this micro-batch's own gradient is computed with ``torch.autograd.grad`` (so it never
    depends on what ``param.grad`` held before), the record's norm and sketch are taken from it, and then it is
    ADDED to ``param.grad`` (set where it was ``None``). Callers accumulate micro-batches by calling this in a row
    and zero the grads themselves when an optimizer step is done.

    Randomness: a CPU generator seeded with ``seed`` draws everything random the objective needs
    (:func:`ddpm_loss`, :func:`omi.models.flow.flow_matching_loss` say in which order).

    :param model: the UNet or the text-to-image transformer; its parameters decide the gradient
    :param scheduler: the DDPM scheduler of a UNet, the flow-matching scheduler of a transformer
    :param batch: clean images ``(N, C, H, W)`` in ``[-1, 1]`` (a UNet), or a :class:`LatentBatch` (a transformer)
    :param seed: from :func:`micro_batch_seed`
    :param prediction_type: ``epsilon`` or ``v_prediction`` (a UNet), ``flow`` (a transformer); the RunSpec's
    :param sketch: the run's gradient sketch, or ``None`` for an empty sketch in the record
    :param index: the micro-batch index stored in the record
    """
    params = trainable_parameters(model)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    if isinstance(batch, LatentBatch):
        if prediction_type != FLOW_PREDICTION:
            raise ValueError(f"a text-to-image micro-batch trains with prediction_type '{FLOW_PREDICTION}', "
                             f"not '{prediction_type}'")
        loss = flow_matching_loss(model, scheduler, batch, generator)
    else:
        loss = ddpm_loss(model, scheduler, batch, generator, prediction_type)
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    segments = gradient_segments(list(grads), params)
    norms = [torch.linalg.vector_norm(values) for _, values in segments]
    grad_norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
    sketch_values = sketch.of_segments(segments) if sketch is not None else torch.empty(0, dtype=torch.float32)
    with torch.no_grad():
        for param, grad in zip(params, grads, strict=True):
            if grad is None:
                continue
            if param.grad is None:
                param.grad = grad.detach()
            else:
                param.grad.add_(grad)
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        logger.warning("micro-batch %d: non-finite loss %s", index, loss_value)
    return MicroBatchRecord(index=int(index), samples=len(batch), loss=loss_value, grad_norm=grad_norm,
                            sketch=sketch_values)
