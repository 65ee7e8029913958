"""CenteredClip, a robust replacement for the mean in hivemind's butterfly all-reduce.

**CenteredClip** (Karimireddy, He, Jaggi 2021, "Learning from History for Byzantine Robust Optimization";
as in BTARD, Gorbunov et al. 2022): with ``averaging.reducer = "centered_clip"`` every tensor part of the round
averager's butterfly all-reduce of the pseudo-gradients is reduced by its owner as

    v ← v + Σᵢ wᵢ·min(1, τ/‖xᵢ − v‖)·(xᵢ − v) / Σᵢ wᵢ    (``clip_iterations`` times, τ = ``clip_tau``)

instead of the weighted mean Σᵢ wᵢxᵢ/Σᵢ wᵢ. v starts at the coordinate-wise median of the senders' parts (a
reducer keeps no history across rounds, and the mean would start next to an outlier). When every part lies
within τ of the start, one iteration gives exactly the weighted mean, so honest swarms lose nothing. τ bounds
the norm of a *part* (hivemind splits the flat vector in parts of at most ``part_size_bytes``, 512 KiB by
default), not of the whole pseudo-gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from hivemind.averaging.partition import TensorPartReducer
from omi.swarm.averagers import TrackedAllReduceRunner
from omi.swarm.upstream import PartReducerHooks


def centered_clip(parts: torch.Tensor, weights: torch.Tensor, *, tau: float, iterations: int) -> torch.Tensor:
    """CenteredClip of ``parts`` (one row per sender, any trailing shape) with per-sender ``weights``.

    Senders with zero weight are left out (hivemind's peers that "tag along" with weight 0).

    >>> honest = torch.ones(3, 4)
    >>> attacker = -1000 * torch.ones(1, 4)
    >>> centered_clip(torch.cat([honest, attacker]), torch.ones(4), tau=1.0, iterations=3)
    tensor([0.8359, 0.8359, 0.8359, 0.8359])
    """
    assert parts.shape[0] == weights.shape[0], "one weight per sender"
    assert tau > 0 and iterations >= 1, "tau must be positive and iterations at least 1"
    keep = weights > 0
    points, weights = parts[keep].flatten(1).to(torch.float64), weights[keep].to(torch.float64)
    if points.shape[0] == 0:
        return torch.full(parts.shape[1:], float("nan"), dtype=parts.dtype)
    center = points.median(dim=0).values
    for _ in range(iterations):
        diffs = points - center
        scales = torch.clamp(tau / diffs.norm(dim=1).clamp_min(1e-30), max=1.0)
        center = center + (weights * scales) @ diffs / weights.sum()
    return center.to(parts.dtype).view(parts.shape[1:])


class CenteredClipReducer(PartReducerHooks, TensorPartReducer):
    """hivemind's ``TensorPartReducer`` reducing each part by :func:`centered_clip` instead of the weighted mean.

    It keeps every sender's copy of the current part (one part per sender in memory) until all arrived.

    :param part_shapes: shapes of the parts this peer reduces
    :param num_senders: peers in the group that send parts
    :param tau: clipping radius
    :param iterations: CenteredClip iterations
    """

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, *, tau: float, iterations: int):
        self.tau, self.iterations = tau, iterations
        self._parts: list[torch.Tensor] = []
        self._weights: list[float] = []
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self):
        self._parts, self._weights = [], []
        super().reset_accumulators()

    def add_part(self, tensor_part: torch.Tensor, weight: float) -> None:
        self._parts.append(tensor_part)
        self._weights.append(weight)

    def reduce_part(self, shape: torch.Size) -> torch.Tensor:
        if not self._parts:
            return torch.full(shape, float("nan"))
        return centered_clip(torch.stack(self._parts), torch.tensor(self._weights), tau=self.tau,
                             iterations=self.iterations)


class CenteredClipAllReduceRunner(TrackedAllReduceRunner):
    """hivemind's butterfly ``AllReduceRunner`` whose local reducer is a :class:`CenteredClipReducer`.

    :param tau: clipping radius; :param iterations: CenteredClip iterations; other arguments: ``AllReduceRunner``'s
    """

    def __init__(self, *, tau: float, iterations: int, **kwargs):
        super().__init__(**kwargs)
        self.replace_part_reducer(lambda shapes, senders: CenteredClipReducer(shapes, senders, tau=tau,
                                                                              iterations=iterations))

