"""The volunteers' optimizer: ``hivemind.Optimizer`` with access-controlled averagers, configured from the RunSpec."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import hivemind
import torch
from hivemind.optim.grad_averager import GradientAverager
from omi.models.optimizer import optimizer_for
from omi.protos import pb
from omi.swarm.access import PeerAccessGate
from omi.swarm.averagers import (
    AccessControlledGradientAverager,
    AccessControlledTrainingStateAverager,
    AllReduceRunnerFactory,
)
from omi.swarm.compression import COMPRESSIONS
from omi.swarm.reduce import CenteredClipAllReduceRunner

logger = logging.getLogger(__name__)

class SwarmOptimizer(hivemind.Optimizer):
    """``hivemind.Optimizer`` whose state averager is access-controlled (the gradient averager comes through
    ``grad_averager_factory``) and which can be told never to download state from peers.

    :param access: the run's :class:`PeerAccessGate`
    :param allreduce_runner: all-reduce runner of the state averager (None: hivemind's weighted mean); the
        gradient averager's comes with ``grad_averager_factory``
    :param allow_load_state: if False, never load state from peers (``averaging.load_state_from_peers``)
    :param kwargs: ``hivemind.Optimizer``'s arguments
    """

    def __init__(self, *, access: PeerAccessGate, allreduce_runner: AllReduceRunnerFactory | None = None,
                 allow_load_state: bool = True, **kwargs):
        self._access, self._allreduce_runner, self.allow_load_state = access, allreduce_runner, allow_load_state
        self.state_loads = 0  # times this peer replaced its state with the swarm's (it was behind)
        super().__init__(**kwargs)

    def _make_state_averager(self, **kwargs) -> AccessControlledTrainingStateAverager:
        # hivemind.Optimizer._make_state_averager with the access-controlled class
        return AccessControlledTrainingStateAverager(
            access=self._access, allreduce_runner=self._allreduce_runner,
            dht=self.dht, prefix=f"{self.run_id}_state_averager", min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout, shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer, custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel, next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode, auxiliary=self.auxiliary, start=True, **kwargs)

    def _should_load_state_from_peers(self) -> bool:
        return self.allow_load_state and super()._should_load_state_from_peers()

    def load_state_from_peers(self, **kwargs):
        # counted so the trainer knows when its micro-batches were dropped for the swarm's newer state
        self.state_loads += 1
        return super().load_state_from_peers(**kwargs)

    @property
    def grad_group_size(self) -> int:
        """Peers in the last successful gradient all-reduce (0: none yet; 1 never happens, alone it skips)."""
        return self.grad_averager.last_group_size

    @property
    def grad_rounds_averaged(self) -> int:
        """Successful gradient all-reduce rounds so far."""
        return self.grad_averager.rounds_averaged


def make_optimizer(model: torch.nn.Module, spec: pb.RunSpec, dht: hivemind.DHT, *, batch_size_per_step: int,
                   load_state_timeout: float | None = None, verbose: bool = False,
                   **optimizer_kwargs) -> SwarmOptimizer:
    """A ``hivemind.Optimizer`` for ``model`` configured from ``spec``, averaging only with token holders.

    - ``run_id`` = ``spec.dht_prefix``; ``target_batch_size`` and the optimizer (AdamW with ``learning_rate`` and
      ``weight_decay``, clipping the averaged gradient to ``max_grad_norm``: :func:`omi.models.optimizer.optimizer_for`)
      from ``spec.training``; ``matchmaking_time``, ``averaging_timeout``, ``compression`` (of gradients; state is
      averaged and downloaded uncompressed so parameters stay exact), ``load_state_from_peers`` and the reducer
      (``mean`` or ``centered_clip`` with ``clip_tau``, ``clip_iterations``) from ``spec.averaging``.

    :param model: the module to train (its parameters are handed to the optimizer)
    :param spec: the RunSpec
    :param dht: this node's DHT from :func:`start_dht`
    :param batch_size_per_step: samples between two calls of ``opt.step()`` on this node
    :param load_state_timeout: give up loading state from peers after this long (default: 2 × averaging_timeout)
    :param verbose: log hivemind's progress ("Averaged gradients with N peers", …) at INFO
    :param optimizer_kwargs: further ``hivemind.Optimizer`` arguments (e.g. ``tracker_opts``), overriding ours
    """
    averaging = spec.averaging
    if averaging.compression not in COMPRESSIONS:
        raise ValueError(f"averaging.compression must be one of {', '.join(COMPRESSIONS)}, "
                         f"got {averaging.compression!r}")
    if averaging.reducer == "centered_clip":
        runner = functools.partial(CenteredClipAllReduceRunner, tau=averaging.clip_tau,
                                   iterations=averaging.clip_iterations)
        # parameters: a radius of their own, from the senders' spread (see centered_clip)
        state_runner = functools.partial(CenteredClipAllReduceRunner, tau=None, iterations=averaging.clip_iterations)
    elif averaging.reducer in ("mean", ""):
        runner = state_runner = None
    else:
        raise ValueError(f"averaging.reducer must be mean or centered_clip, got {averaging.reducer!r}")
    access = PeerAccessGate(spec.coordinator_public_key, spec.run_id, spec.dht_prefix)
    grad_averager: Callable[..., GradientAverager] = functools.partial(
        AccessControlledGradientAverager, access=access, allreduce_runner=runner)
    kwargs = dict(
        dht=dht, run_id=spec.dht_prefix, target_batch_size=spec.training.target_batch_size,
        batch_size_per_step=batch_size_per_step, params=list(model.parameters()),
        optimizer=optimizer_for(spec.training),
        matchmaking_time=averaging.matchmaking_time, averaging_timeout=averaging.averaging_timeout,
        # hivemind waits only matchmaking_time for a peer's next chunk, then averages without it; on busy CPUs that
        # drops parts of honest peers and their parameters drift apart. A vanished peer costs this much wait.
        next_chunk_timeout=max(averaging.matchmaking_time, averaging.averaging_timeout / 2),
        load_state_timeout=load_state_timeout or 2 * averaging.averaging_timeout,
        grad_compression=COMPRESSIONS[averaging.compression](), grad_averager_factory=grad_averager,
        verbose=verbose,
    )
    kwargs.update(optimizer_kwargs)
    return SwarmOptimizer(access=access, allreduce_runner=state_runner,
                          allow_load_state=averaging.load_state_from_peers, **kwargs)
