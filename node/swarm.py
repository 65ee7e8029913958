"""hivemind glue of a volunteer node: the token-gated DHT, the access-controlled optimizer, CenteredClip averaging.

A node joins the run's swarm in three steps (each in the main thread of its process: hivemind forks the
DHT and the averagers from there)::

    peer_id = load_or_create_peer_identity(state_dir / "p2p.id")        # registered as RegisterRequest.peer_id
    swarm_key = load_or_create_swarm_key(state_dir / "swarm_rsa.pem")   # RegisterRequest.swarm_public_key
    tokens = TokenFile(state_dir / "token.bin"); tokens.write(register_response.token)  # rewrite on renewal
    dht = start_dht(spec, tokens, swarm_key=swarm_key, identity_path=state_dir / "p2p.id")
    opt = make_optimizer(model, spec, dht, batch_size_per_step=spec.training.micro_batch_size)

How access control works is described in :mod:`omi.protos.swarmauth` and ``docs/swarm.md``.

**CenteredClip** (Karimireddy, He, Jaggi 2021, "Learning from History for Byzantine Robust Optimization";
as in BTARD, Gorbunov et al. 2022): with ``averaging.reducer = "centered_clip"`` every tensor part of
hivemind's butterfly all-reduce is reduced by its owner as

    v ← v + Σᵢ wᵢ·min(1, τ/‖xᵢ − v‖)·(xᵢ − v) / Σᵢ wᵢ    (``clip_iterations`` times, τ = ``clip_tau``)

instead of the weighted mean Σᵢ wᵢxᵢ/Σᵢ wᵢ. v starts at the coordinate-wise median of the senders' parts (a
reducer keeps no history across rounds, and the mean would start next to an outlier). When every part lies
within τ of the start, one iteration gives exactly the weighted mean, so honest swarms lose nothing. τ bounds
the norm of a *part* (hivemind splits the flat vector in parts of at most ``part_size_bytes``, 512 KiB by
default), not of the whole gradient. The state averager reduces the parameters by CenteredClip too, with a
radius taken from the senders (twice their median distance to the median, :func:`centered_clip` with
``tau=None``): a fixed τ that suits gradients is far wider than the gap between honest peers' parameters, and a
peer whose parameters lag (seen: a x-1000 sign-flipper that once stepped alone poisoned its own AdamW statistics
and stopped moving) would pull every peer back by its share in each round.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Sequence

import hivemind
import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.compression import CompressionBase, Float16Compression, NoCompression, ScaledFloat16Compression
from hivemind.compression.quantization import Uniform8BitQuantization
from hivemind.optim.grad_averager import GradientAverager
from hivemind.utils.crypto import RSAPrivateKey
from omi.protos import pb
from omi.protos.swarmauth import (
    AccessControlledGradientAverager,
    AccessControlledTrainingStateAverager,
    AccessDenied,
    PeerAccessGate,
    TokenProvider,
    is_valid_access_token,
    make_dht,
    swarm_public_key,
)

logger = logging.getLogger(__name__)

COMPRESSIONS: dict[str, Callable[[], CompressionBase]] = {
    "none": NoCompression,
    "float16": Float16Compression,
    "scaled_float16": ScaledFloat16Compression,
    "uniform8bit": Uniform8BitQuantization,
}


def start_dht(spec: pb.RunSpec, token_provider: TokenProvider, *, swarm_key: RSAPrivateKey,
              identity_path: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int = 0,
              client_mode: bool = False, announce_host: str | None = None) -> hivemind.DHT:
    """Start this node's DHT peer of ``spec``'s run, joined to ``spec.initial_peers``, with the token authorizer.

    :param spec: the RunSpec (``coordinator_public_key``, ``run_id``, ``dht_prefix``, ``initial_peers`` are used)
    :param token_provider: returns the node's current coordinator-signed token; called in the DHT process, so
      renewals must reach it across processes (use :class:`omi.protos.swarmauth.TokenFile`)
    :param swarm_key: the RSA key bound in the token as ``swarm_public_key``; signs every DHT request
    :param identity_path: libp2p private key file: a stable peer id across restarts (created if missing)
    :param host: address to listen on
    :param port: TCP port to listen on (0: any free port)
    :param client_mode: for volunteers behind NAT: make outgoing connections only, serve no RPCs
    :param announce_host: the address other peers should dial (needs an explicit ``port``)
    :returns: a started ``hivemind.DHT``; it re-publishes the node's token in the run's token registry
    :raises AccessDenied: if the provider's token is not valid now (a banned node cannot renew it)
    """
    if not spec.dht_prefix or "." in spec.dht_prefix:
        raise ValueError(f"RunSpec.dht_prefix must be non-empty and without '.', got {spec.dht_prefix!r}")
    token = token_provider()
    if not is_valid_access_token(token, spec.coordinator_public_key, spec.run_id,
                                 swarm_public_key=swarm_public_key(swarm_key)):
        # every peer would refuse us; say why instead of hivemind's "bootstrap failed"
        raise AccessDenied(f"the access token of node {token.node_id or '?'} is not valid for run {spec.run_id!r} "
                           "(expired, of another run, or not bound to this swarm key): renew it first")
    return make_dht(spec, token_provider, swarm_key, initial_peers=list(spec.initial_peers),
                    identity_path=None if identity_path is None else str(identity_path), host=host, port=port,
                    client_mode=client_mode, announce_host=announce_host)


# ---------------------------------------------------------------- CenteredClip


ADAPTIVE_TAU_FACTOR = 2.0  # adaptive radius: this many times the senders' median distance to the median


def centered_clip(parts: torch.Tensor, weights: torch.Tensor, *, tau: float | None,
                  iterations: int) -> torch.Tensor:
    """CenteredClip of ``parts`` (one row per sender, any trailing shape) with per-sender ``weights``.

    Senders with zero weight are left out (hivemind's peers that "tag along" with weight 0). ``tau=None`` picks
    the radius from the senders: :data:`ADAPTIVE_TAU_FACTOR` times their median distance to the start (the state
    averager's choice: honest peers' parameters lie far closer together than any fixed radius that suits
    gradients, and a peer whose parameters lag behind would otherwise pull everyone back by its share).

    >>> honest = torch.ones(3, 4)
    >>> attacker = -1000 * torch.ones(1, 4)
    >>> centered_clip(torch.cat([honest, attacker]), torch.ones(4), tau=1.0, iterations=3)
    tensor([0.8359, 0.8359, 0.8359, 0.8359])
    """
    assert parts.shape[0] == weights.shape[0], "one weight per sender"
    assert (tau is None or tau > 0) and iterations >= 1, "tau must be positive (or None) and iterations at least 1"
    keep = weights > 0
    points, weights = parts[keep].flatten(1).to(torch.float64), weights[keep].to(torch.float64)
    if points.shape[0] == 0:
        return torch.full(parts.shape[1:], float("nan"), dtype=parts.dtype)
    center = points.median(dim=0).values
    if tau is None:
        tau = ADAPTIVE_TAU_FACTOR * float((points - center).norm(dim=1).median())
        if tau == 0.0:  # most senders hold exactly the median
            return center.to(parts.dtype).view(parts.shape[1:])
    for _ in range(iterations):
        diffs = points - center
        scales = torch.clamp(tau / diffs.norm(dim=1).clamp_min(1e-30), max=1.0)
        center = center + (weights * scales) @ diffs / weights.sum()
    return center.to(parts.dtype).view(parts.shape[1:])


class CenteredClipReducer(TensorPartReducer):
    """hivemind's ``TensorPartReducer`` reducing each part by :func:`centered_clip` instead of the weighted mean.

    It keeps every sender's copy of the current part (one part per sender in memory) until all arrived.

    :param part_shapes: shapes of the parts this peer reduces
    :param num_senders: peers in the group that send parts
    :param tau: clipping radius
    :param iterations: CenteredClip iterations
    """

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, *, tau: float | None, iterations: int):
        self.tau, self.iterations = tau, iterations
        self._parts: list[torch.Tensor] = []
        self._weights: list[float] = []
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self):
        self._parts, self._weights = [], []
        super().reset_accumulators()

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        # hivemind's accumulate_part, storing the part instead of adding it to a running sum
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait({self.current_part_future, asyncio.create_task(self.finished.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self.__class__.__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self._parts.append(tensor_part)
            self._weights.append(weight)
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await current_part_future

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            shape = self.part_shapes[self.current_part_index]
            if self._parts:
                result = centered_clip(torch.stack(self._parts), torch.tensor(self._weights), tau=self.tau,
                                       iterations=self.iterations)
            else:
                result = torch.full(shape, float("nan"))
            self.current_part_future.set_result(result)
            self.reset_accumulators()


class CenteredClipAllReduceRunner(AllReduceRunner):
    """hivemind's butterfly ``AllReduceRunner`` whose local reducer is a :class:`CenteredClipReducer`.

    :param tau: clipping radius; :param iterations: CenteredClip iterations; other arguments: ``AllReduceRunner``'s
    """

    def __init__(self, *, tau: float | None, iterations: int, **kwargs):
        super().__init__(**kwargs)
        self.tensor_part_reducer = CenteredClipReducer(
            tuple(part.shape for part in self.parts_for_local_averaging), len(self.sender_peer_ids),
            tau=tau, iterations=iterations)


# ---------------------------------------------------------------- optimizer


class SwarmOptimizer(hivemind.Optimizer):
    """``hivemind.Optimizer`` whose state averager is access-controlled (the gradient averager comes through
    ``grad_averager_factory``) and which can be told never to download state from peers.

    :param access: the run's :class:`PeerAccessGate`
    :param allreduce_runner: all-reduce runner of the state averager (None: hivemind's weighted mean); the
        gradient averager's comes with ``grad_averager_factory``
    :param allow_load_state: if False, never load state from peers (``averaging.load_state_from_peers``)
    :param kwargs: ``hivemind.Optimizer``'s arguments
    """

    def __init__(self, *, access: PeerAccessGate, allreduce_runner: Callable[..., AllReduceRunner] | None = None,
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

    - ``run_id`` = ``spec.dht_prefix``; ``target_batch_size``, ``learning_rate``, ``weight_decay`` (AdamW) from
      ``spec.training``; ``matchmaking_time``, ``averaging_timeout``, ``compression`` (of gradients; state is
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
        optimizer=functools.partial(torch.optim.AdamW, lr=spec.training.learning_rate,
                                    weight_decay=spec.training.weight_decay),
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
