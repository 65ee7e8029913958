"""The optimizer of a run's training step: AdamW with the RunSpec's settings, clipping the step's gradient first.

Every trainer of a run uses it — a volunteer's inner steps (:class:`omi.swarm.RoundOptimizer`), the validator that
replays a segment of them, and ``train-local`` — so the inner step a swarm takes is the step one process takes on the
same gradient.

>>> model = torch.nn.Linear(2, 1)
>>> model.weight.grad, model.bias.grad = torch.full((1, 2), 30.0), torch.full((1,), 40.0)
>>> optimizer = ClippedAdamW(model.parameters(), lr=1e-3, max_grad_norm=1.0)
>>> optimizer.step()
>>> round(float(torch.cat([model.weight.grad.flatten(), model.bias.grad]).norm()), 4)
1.0
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from omi.protos import pb


class ClippedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` that scales the gradient down to ``max_grad_norm`` (global L2 norm) before each step.

    :param params: parameters or parameter groups
    :param max_grad_norm: the largest gradient norm a step uses (0: no clipping)
    :param kwargs: ``AdamW``'s arguments
    """

    def __init__(self, params: Iterable, *, max_grad_norm: float, **kwargs):
        assert max_grad_norm >= 0, "max_grad_norm must be >= 0 (0: no clipping)"
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm

    def step(self, closure=None):
        if self.max_grad_norm > 0:
            grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
        return super().step(closure)


def optimizer_for(training: pb.TrainingSpec) -> Callable[[Iterable], ClippedAdamW]:
    """The optimizer factory of a run: its inner AdamW, as volunteers, validators and ``train-local`` build it."""
    return functools.partial(ClippedAdamW, lr=training.learning_rate, weight_decay=training.weight_decay,
                             max_grad_norm=training.max_grad_norm)
