"""Replay: the recompute-and-compare check every validator uses on an audited micro-batch.

A validator holding the parameters the node started from recomputes the micro-batch with
:func:`omi.models.microbatch.compute_micro_batch` (same samples, same seed) and compares loss, gradient norm and
gradient sketch with what the node committed to, each as a relative difference against :class:`Tolerances`.

>>> import torch
>>> from omi.models.microbatch import MicroBatchRecord
>>> claimed = MicroBatchRecord(0, 32, 0.5, 2.0, torch.tensor([1.0, 2.0]))
>>> compare(claimed, MicroBatchRecord(0, 32, 0.5, 2.0, torch.tensor([1.0, 2.0000001])), Tolerances()).passed
True
>>> compare(claimed, MicroBatchRecord(0, 32, 0.5, 2.0, torch.tensor([1.0, 2.1])), Tolerances()).passed
False
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from omi.models.data import DataSource
from omi.models.microbatch import GradientSketch, MicroBatchRecord, compute_micro_batch
from omi.protos import pb

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerances:
    """Largest relative differences (``|claimed - recomputed| / |recomputed|``) a passing micro-batch may show.

    Calibrated on unet-digits-16 with micro-batches of 32 (``python -m bench.bench_models``; docs/models.md):
    honest recomputations differed by at most 2.6e-7 (norm) and 1.4e-6 (sketch) between 1 and 2 torch threads,
    and by 1.3e-6 (sketch) against a float64 recomputation, while 1 of 32 samples swapped showed loss 1.8e-4,
    norm 5.7e-3, sketch 1.5e-2; bfloat16 autocast norm 1.8e-2, sketch 3.3e-2; another seed sketch 0.84. The
    defaults sit ~100x above honest float32 noise (room for CUDA with TF32 off, see ``pick_device``, which could
    not be measured here) and below every dishonest figure; the sketch is the discriminating number.
    """

    loss: float = 1e-4  # relative difference of the mean loss
    norm: float = 1e-4  # relative difference of the gradient L2 norm
    sketch: float = 1e-3  # ||claimed - recomputed|| / ||recomputed|| of the gradient sketch

    @classmethod
    def exact(cls) -> Tolerances:
        """Same machine, same thread count: recomputation is bitwise equal, so nothing may differ."""
        return cls(loss=0.0, norm=0.0, sketch=0.0)


@dataclass(frozen=True)
class Check:
    """The verdict on one micro-batch."""

    index: int  # micro-batch index
    loss_diff: float  # relative differences, as in Tolerances (inf when the records are not comparable)
    norm_diff: float
    sketch_diff: float
    passed: bool

    def to_proto(self) -> pb.MicroBatchCheck:
        return pb.MicroBatchCheck(index=self.index, loss_diff=self.loss_diff, norm_diff=self.norm_diff,
                                  sketch_diff=self.sketch_diff, passed=self.passed)


def _relative(claimed: float, recomputed: float) -> float:
    if not (math.isfinite(claimed) and math.isfinite(recomputed)):
        return math.inf
    if claimed == recomputed:
        return 0.0
    return abs(claimed - recomputed) / max(abs(recomputed), 1e-12)


def recompute(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    source: DataSource,
    sample_indices: Sequence[int],
    seed: int,
    prediction_type: str,
    sketch: GradientSketch | None,
    *,
    index: int = 0,
    keep_grad: bool = False,
) -> MicroBatchRecord:
    """Recompute one micro-batch from the samples and seed the node was given.

    The model must hold the parameters the node started from (compare ``params_hash``). Its gradients are cleared
    before and (unless ``keep_grad``, for an optimizer step to follow) after, so the validator's model is left as
    it was found, minus any stale ``.grad``.
    """
    model.zero_grad(set_to_none=True)
    try:
        return compute_micro_batch(model, scheduler, source.get(sample_indices), seed,
                                   prediction_type=prediction_type, sketch=sketch, index=index)
    finally:
        if not keep_grad:
            model.zero_grad(set_to_none=True)


def compare(claimed: MicroBatchRecord, recomputed: MicroBatchRecord, tol: Tolerances) -> Check:
    """Compare a node's record with the validator's recomputation; every difference must be within ``tol``."""
    loss_diff = _relative(claimed.loss, recomputed.loss)
    norm_diff = _relative(claimed.grad_norm, recomputed.grad_norm)
    if claimed.sketch.shape != recomputed.sketch.shape:
        sketch_diff = math.inf
    else:
        difference = float(torch.linalg.vector_norm(claimed.sketch.float() - recomputed.sketch.float()))
        scale = float(torch.linalg.vector_norm(recomputed.sketch.float()))
        sketch_diff = 0.0 if difference == 0 else difference / max(scale, 1e-12)
        if not math.isfinite(sketch_diff):
            sketch_diff = math.inf
    comparable = claimed.index == recomputed.index and claimed.samples == recomputed.samples
    passed = comparable and loss_diff <= tol.loss and norm_diff <= tol.norm and sketch_diff <= tol.sketch
    if not passed:
        logger.info("micro-batch %d failed: loss %.2e, norm %.2e, sketch %.2e (comparable: %s)",
                    claimed.index, loss_diff, norm_diff, sketch_diff, comparable)
    return Check(index=claimed.index, loss_diff=loss_diff, norm_diff=norm_diff, sketch_diff=sketch_diff,
                 passed=passed)
