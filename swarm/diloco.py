"""The DiLoCo algorithm of a round, torch only: θ_r, the pseudo-gradient Δ = θ_r − θ_local and the outer step.

Every training peer holds the same :class:`GlobalState` (θ_r on the CPU in float32, the outer optimizer's momentum,
r); at a round's end it computes Δ from its model (:func:`pseudo_gradient`), the swarm averages the Δs, and every
peer applies the same outer step to the same average (:meth:`GlobalState.advance`), so honest peers hold bitwise
the same θ_{r+1}. Nothing here knows hivemind: :mod:`omi.swarm.rounds` runs it over the network.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field

import torch
from omi.protos import pb


def theta_hash(params: list[torch.Tensor]) -> str:
    """SHA-256 (hex) of float32 CPU parameters θ, in order: what a round's members gather as ``theta`` and the
    coordinator publishes for each round it witnessed."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def outer_optimizer(params: list[torch.Tensor], rounds: pb.RoundsSpec) -> torch.optim.SGD:
    """The outer optimizer of the global parameters θ (``[rounds]``: SGD, momentum, Nesterov), its momentum buffers
    made at once so the state served to late joiners never changes shape."""
    outer = torch.optim.SGD(params, lr=rounds.outer_learning_rate, momentum=rounds.outer_momentum,
                            nesterov=rounds.outer_nesterov)
    for p in params:
        outer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return outer


def outer_step(outer: torch.optim.SGD, params: list[torch.Tensor], averaged: list[torch.Tensor]) -> None:
    """θ_{r+1} = OuterStep(θ_r, Δ̄): the same step on every peer that holds θ_r and received Δ̄."""
    for p, d in zip(params, averaged, strict=True):
        p.grad = d
    outer.step()
    for p in params:
        p.grad = None


def pseudo_gradient(theta: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Δ = θ_r − θ_local on the CPU in float32: how far this peer's inner steps moved it from the round's start."""
    return [g - p.detach().to("cpu", torch.float32) for g, p in zip(theta, params, strict=True)]


def reset_to(params: list[torch.Tensor], theta: list[torch.Tensor]) -> None:
    """Put θ into the model's (local) parameters, in their device and dtype: the next inner steps start there."""
    with torch.no_grad():
        for p, g in zip(params, theta, strict=True):
            p.copy_(g.to(p.device, p.dtype))


@dataclass
class ServedState:
    """A state a peer served, checked against this run's shapes (:meth:`GlobalState.read`)."""

    round: int
    theta: list[torch.Tensor]
    momentum: list[torch.Tensor]


def read_served(metadata: object, tensors: list[torch.Tensor], shapes: list[torch.Size]) -> ServedState | None:
    """The (round, θ, outer momentum) in what a peer served as ``(metadata, tensors)``, or None unless it is a state of
    parameters of these ``shapes``: metadata ``{"round": r}``, then θ and the momentum, one tensor per parameter each.

    >>> read_served({"round": 4}, [torch.ones(2), torch.zeros(2)], [torch.Size([2])]).round
    4
    >>> read_served({"round": 4}, [torch.ones(3), torch.zeros(3)], [torch.Size([2])]) is None  # another model
    True
    """
    count = len(shapes)
    if not isinstance(metadata, dict) or not isinstance(metadata.get("round"), int) or len(tensors) != 2 * count \
            or any(t.shape != shape for t, shape in zip(tensors, shapes * 2, strict=True)):
        return None
    return ServedState(metadata["round"], list(tensors[:count]), list(tensors[count:]))


@dataclass(eq=False)
class GlobalState:
    """What every training peer of a round holds alike: θ_r (CPU, float32), the outer optimizer with its momentum,
    and the round r. It is what a peer serves to late joiners (:meth:`serve`) and adopts from one (:meth:`read`,
    :meth:`load`); its :meth:`hash` is what a round's group and the coordinator compare. Every method holds
    ``lock``: the averager serves the state from another thread.

    >>> rounds = pb.RoundsSpec(outer_learning_rate=0.7, outer_momentum=0.9, outer_nesterov=True)
    >>> state = GlobalState.initial([torch.zeros(2)], rounds)
    >>> state.advance([torch.ones(2)])  # Nesterov: Δ̄ + 0.9 × momentum (now Δ̄), times 0.7
    >>> state.round, state.theta, state.momentum
    (1, [tensor([-1.3300, -1.3300])], [tensor([1., 1.])])
    >>> state.hash() == theta_hash(state.theta) != theta_hash([torch.zeros(2)])  # θ_1's, not θ_0's
    True

    :param theta: the global parameters θ_r, the tensors ``outer`` steps
    :param outer: the outer optimizer (:func:`outer_optimizer`), which holds the momentum
    :param round: r
    """

    theta: list[torch.Tensor]
    outer: torch.optim.SGD
    round: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _hash: str | None = field(default=None, repr=False)  # cache of hash(); None after θ changed

    @classmethod
    def initial(cls, params: list[torch.Tensor], rounds: pb.RoundsSpec) -> GlobalState:
        """Round 0's state: a float32 CPU copy of ``params`` (θ_0, the same on every peer built from the RunSpec's
        seed) and zero momentum."""
        theta = [p.detach().to("cpu", torch.float32, copy=True) for p in params]
        return cls(theta, outer_optimizer(theta, rounds))

    @property
    def momentum(self) -> list[torch.Tensor]:
        return [self.outer.state[p]["momentum_buffer"] for p in self.theta]

    def hash(self) -> str:
        """:func:`theta_hash` of θ_r: equal on two peers exactly when they hold the same θ_r."""
        with self.lock:
            if self._hash is None:
                self._hash = theta_hash(self.theta)
            return self._hash

    def serve(self) -> tuple[dict, list[torch.Tensor]]:
        """``(metadata, tensors)`` as a peer serves them: ``{"round": r}``, then copies of θ and the momentum."""
        with self.lock:
            return dict(round=self.round), [t.clone() for t in self.theta + self.momentum]

    def read(self, metadata: object, tensors: list[torch.Tensor]) -> ServedState | None:
        """:func:`read_served` against this state's shapes: None unless a peer served a state of this model."""
        return read_served(metadata, tensors, [p.shape for p in self.theta])

    def set(self, round: int, theta: list[torch.Tensor], momentum: list[torch.Tensor] | None = None) -> None:
        """Adopt θ and the outer momentum (None: zeros) as round ``round``'s start."""
        with self.lock:
            for target, source in zip(self.theta, theta, strict=True):
                target.copy_(source)
            for target, source in zip(self.momentum, momentum or [torch.zeros_like(p) for p in self.theta],
                                      strict=True):
                target.copy_(source)
            self.round, self._hash = round, None

    def load(self, served: ServedState) -> None:
        """Adopt a state a peer served (:meth:`read`)."""
        self.set(served.round, served.theta, served.momentum)

    def advance(self, averaged: list[torch.Tensor] | None) -> None:
        """End round r: θ_{r+1} = OuterStep(θ_r, ``averaged``), or θ_{r+1} = θ_r when no step applies (None)."""
        with self.lock:
            if averaged is not None:
                outer_step(self.outer, self.theta, averaged)
                self._hash = None
            self.round += 1
