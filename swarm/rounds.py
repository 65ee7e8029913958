"""DiLoCo rounds on hivemind: many local inner steps, then one averaged, compressed outer step.

A **round** r of a run with ``[rounds] inner_steps = H > 0`` (DiLoCo, Douillard et al. 2023; OpenDiLoCo on
hivemind, Jaghouar et al. 2024):

1. every training peer starts from the same parameters θ_r (the *global* parameters, kept on the CPU in float32);
2. it takes inner steps — the RunSpec's AdamW, one per micro-batch — on its own data and reports its samples to
   hivemind's ``ProgressTracker``; the round closes when the swarm has trained ``H × micro_batch_size`` samples
   per training peer, so a fast peer takes more inner steps than a slow one and neither waits for the other;
3. the peers all-reduce their pseudo-gradients Δ = θ_r − θ_local with hivemind's butterfly all-reduce, weighted
   by samples, compressed as ``[rounds] compression``, reduced by the run's reducer (mean or CenteredClip) and
   only among token holders (:class:`~omi.swarm.averagers.AccessControlledAveragerMixin`);
4. every peer applies the same outer optimizer (SGD with Nesterov momentum, DiLoCo's 0.7 / 0.9) to the same
   averaged Δ and starts round r+1 from θ_{r+1} = OuterStep(θ_r, Δ̄).

**Bitwise identical θ_{r+1}.** hivemind's runner sends each sender the *difference* between the average and the
sender's own part, compressed; adding it back gives every peer a slightly different average (by the compression
error of its own difference). :class:`ExactResultMixin` makes the reducer of each part send the average itself,
compressed once, and use the decompressed copy for its own part too, so every member of the group receives the
same bytes; the outer step runs on the CPU in float32 on the same inputs, so honest peers hold bitwise the same
θ_{r+1} (tests/test_rounds.py checks the hashes).

**Top-k with error feedback** (``[rounds] topk_density < 1``, ``compression = "sparse8bit"`` or ``"sparse4bit"``;
SparseLoCo, Deep Gradient Compression): each peer sends only the largest ``topk_density`` share of the entries of
Δ + e, in 8 (4) bits with their positions, and keeps the rest as its residual e for the next round; with 4 bits
the rounding error stays in e too. The averages of sparse parts are sparse too (at most the group's union of
positions), so both directions of the all-reduce shrink.

**Overlap** (``[rounds] overlap = true``; Streaming DiLoCo, Douillard et al. 2025, and the one-step-delayed outer
update of INTELLECT-1): at the end of round r the all-reduce of Δ_r starts in the background and round r+1 begins
at once from θ_{r+1} = OuterStep(θ_r, Δ̄_{r−1}), the average of the *previous* round, which finished while round r
computed. Compute never waits for the network as long as an all-reduce takes less than a round; the price is an
outer update one round stale (measured in docs/benchmarks.md).

**Failures.** A round whose all-reduce fails (no group in time, a peer vanished mid-transfer) applies no outer
step: θ_{r+1} = θ_r, so peers of a failed group stay identical. A peer that saw others in the round but could not
average with them loads θ and the outer momentum from a peer at the next round start (``load_state_from_peers``,
preferring the peer with the newest round), as does a peer that joins late or falls behind the swarm's round.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import threading
import time
from dataclasses import dataclass

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.partition import AllreduceException
from hivemind.compression import CompressionInfo
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils import MPFuture
from hivemind.utils.timed_storage import get_dht_time
from omi.models.optimizer import optimizer_for
from omi.protos import pb
from omi.swarm.access import PeerAccessGate
from omi.swarm.averagers import AccessControlledAveragerMixin, TrackedAllReduceRunner
from omi.swarm.compression import COMPRESSIONS, top_k_feedback
from omi.swarm.reduce import CenteredClipAllReduceRunner
from omi.swarm.upstream import AverageReturningRunner, load_state_checked, run_in_averager

logger = logging.getLogger(__name__)

PROGRESS_REFRESH = 1.0  # at most this many seconds between two reads of the swarm's round progress


class ExactResultMixin(AverageReturningRunner):
    """Makes a :class:`TrackedAllReduceRunner` return the averages themselves, identical on every peer.

    The reducer of a part sends each sender ``average`` (compressed like the sender's part) instead of hivemind's
    ``average − sender's part``, and registers for its own part the same compressed-and-decompressed average.
    The averager copies results instead of adding them (``returns_averages``). A part whose reducer failed comes
    back as the peer's own part (hivemind's part container with ``return_deltas = False``): the averager then
    reports the round failed (:class:`RoundAverager`), so no peer applies a partial average.
    """

    returns_averages = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._serialized: dict[int, asyncio.Future] = {}  # part -> the average's message

    def _serialized_average(self, part_index: int, averaged: torch.Tensor) -> asyncio.Future:
        """The message of a part's average, serialized **once** for every receiver, this peer included.

        It is compressed by the run's compression object, as the senders' parts are (hivemind's runner serializes
        by the sender's compression *type*, whose encoder is the one registered in that slot: ``Sparse8Bit`` for
        ``sparse4bit`` too, which would send a 4-bit run's averages in 8 bits).

        Serializing it once per receiver is not safe: the 8-bit codecs reduce over the tensor (mean, norm), and
        threads of the executor may do so in another order than the event loop's thread (OpenMP's thread count is
        per calling thread), so two serializations of the same average may differ in the last bit of the scale
        and give two receivers two averages (seen: peers 1e-4 apart in loss after a round they averaged together).
        """
        if part_index not in self._serialized:
            self._serialized[part_index] = asyncio.get_event_loop().run_in_executor(
                None, functools.partial(self.part_compression.compress, averaged,
                                        CompressionInfo.from_tensor(averaged)))
        return self._serialized[part_index]

    async def run(self):
        async for output in super().run():
            yield output
        if self.failed_reducers:  # their parts came back unaveraged: this peer's result is not the group's
            raise AllreduceException(f"{len(self.failed_reducers)} reducer(s) failed; the partial average is unused")


class RoundAllReduceRunner(ExactResultMixin, TrackedAllReduceRunner):
    """The weighted mean, identical on every peer."""


class RoundCenteredClipRunner(ExactResultMixin, CenteredClipAllReduceRunner):
    """CenteredClip, identical on every peer."""


class RoundAverager(AccessControlledAveragerMixin, DecentralizedAverager):
    """The all-reduce of the pseudo-gradients, and the state (θ_r, outer momentum, round) served to late joiners.

    :param deltas: the averaged tensors (pseudo-gradients; moved to shared memory by hivemind)
    :param state: returns ``(metadata, tensors)`` of the current state, called in this (the host) process
    :param kwargs: ``DecentralizedAverager``'s and the mixin's arguments
    """

    def __init__(self, deltas: list[torch.Tensor], *, state=None, **kwargs):
        self._state = state
        super().__init__(averaged_tensors=deltas, **kwargs)

    def get_current_state(self):
        if self._state is None:
            return super().get_current_state()
        metadata, tensors = self._state()
        return metadata, tensors, [CompressionInfo.from_tensor(t, key=i) for i, t in enumerate(tensors)]

    def load_state_checked(self, *, timeout: float, count: int, expect: str | None = None,
                           skip: frozenset[str] = frozenset()):
        """hivemind's ``load_state_from_peers``, trying the peers in order of priority but skipping those in ``skip``
        (base58 peer ids) and, with ``expect``, every peer whose θ (the first ``count`` tensors) does not hash to
        it; returns ``(metadata, tensors, peer id)`` of the first state accepted, or None."""
        return run_in_averager(self, "_load_state_checked", timeout=timeout, count=count, expect=expect,
                               skip=sorted(skip))

    async def _load_state_checked(self, future: MPFuture, count: int, expect: str | None, skip: list[str]):
        await load_state_checked(self, future, count=count, expect=expect, skip=skip, theta_hash=state_hash)


def state_hash(params: list[torch.Tensor]) -> str:
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


def rounds_prefix(spec: pb.RunSpec) -> str:
    """The hivemind prefix of a run's round averager (its all-reduce and its state for late joiners)."""
    return f"{spec.dht_prefix}_rounds"


def make_runner(spec: pb.RunSpec):
    """The round averager's all-reduce runner for the run's reducer."""
    averaging = spec.averaging
    if averaging.reducer == "centered_clip":
        return functools.partial(RoundCenteredClipRunner, tau=averaging.clip_tau, iterations=averaging.clip_iterations)
    return RoundAllReduceRunner


def min_group_size(spec: pb.RunSpec) -> int:
    """The fewest peers an all-reduce may have: 3 with CenteredClip (in a group of two the median is the mean, so
    one attacker would own its honest partner's round: seen, a x-1000 sign-flipper paired with one honest peer
    blew its loss from 0.2 to 73,000), 2 otherwise."""
    return 3 if spec.averaging.reducer == "centered_clip" else 2


@dataclass
class GroupOutcome:
    """What every member of one all-reduce concludes from the group's gathered data (the same on each member).

    :param canonical: the (round, θ_r hash) the group trained from: the newest round, then the θ most *trainers*
        hold (the witness's own entry is not a vote)
    :param trainers: members that sent a pseudo-gradient (the witness sends none: weight 0)
    :param usable: whether the average may be applied: CenteredClip needs at least 3 trainers (with two the median
        is the mean, and one attacker owns its partner's round), counted without the weight-0 witness
    """

    canonical: tuple[int, str] | None
    trainers: int
    usable: bool


def group_outcome(gathered: dict, spec: pb.RunSpec) -> GroupOutcome:
    """The :class:`GroupOutcome` of an all-reduce from its gathered data (peer -> ``dict(round, theta[, witness])``).

    >>> spec = pb.RunSpec(averaging=pb.AveragingSpec(reducer="centered_clip"))
    >>> group_outcome({"a": dict(round=3, theta="x"), "b": dict(round=3, theta="x"),
    ...                "w": dict(round=3, theta="x", witness=True)}, spec)
    GroupOutcome(canonical=(3, 'x'), trainers=2, usable=False)
    """
    entries = [g for g in gathered.values() if isinstance(g, dict)]
    trainers = [g for g in entries if not g.get("witness")]
    starts = [(g.get("round", -1), g.get("theta", "")) for g in trainers]
    canonical = max(starts, key=lambda start: (start[0], starts.count(start), start[1]), default=None)
    fewest = 3 if spec.averaging.reducer == "centered_clip" else 1
    return GroupOutcome(canonical, len(trainers), len(trainers) >= fewest)


def _cancel(control) -> None:
    """Cancel a hivemind StepControl that may be None or finished already (cancelling one twice raises)."""
    if control is not None and not control.done():
        try:
            control.cancel()
        except Exception as e:  # it finished between the check and the call
            logger.debug("could not cancel an averaging step: %r", e)


@dataclass
class _Average:
    """An all-reduce of one round's pseudo-gradient, started or (alone) not."""

    round: int
    delta: list[torch.Tensor]
    start_hash: str  # the θ_r the pseudo-gradient is relative to
    control: object = None  # hivemind's StepControl; None: no other peer, nothing to average with


@dataclass
class RoundResult:
    """What one round did on this peer."""

    round: int  # the round that closed
    samples: int  # samples this peer trained in it
    inner_steps: int  # inner steps this peer took in it
    group_size: int  # peers whose pseudo-gradients were averaged into the update applied now (1: alone)
    applied: bool  # whether an outer step was applied at this round's end
    bytes_sent: int  # serialized bytes this peer's all-reduces sent since the previous round ended
    sync_seconds: float  # wall seconds this call spent outside compute (waiting for the all-reduce, outer step)
    delta: list[torch.Tensor]  # this peer's pseudo-gradient θ_r − θ_local, on the CPU (before top-k, if any)


class RoundOptimizer:
    """A volunteer's DiLoCo optimizer: inner AdamW on the model, outer Nesterov SGD on the global parameters.

    Create it in the main thread (hivemind forks the averager). The training loop::

        opt = RoundOptimizer(model, spec, dht)
        opt.begin_round()                        # catches up with the swarm if behind
        while not opt.round_closed():
            loss.backward(); opt.inner_step(batch_size); opt.zero_grad()
        result = opt.end_round()                 # all-reduce Δ, outer step; model now holds θ_{r+1}

    :param model: the module to train; its parameters are the local (inner) parameters
    :param spec: the RunSpec (``[rounds]``, ``[training]`` for AdamW, ``[averaging]`` for matchmaking and reducer)
    :param dht: this peer's DHT
    :param client_mode: outgoing connections only (behind NAT)
    :param load_state_timeout: give up loading state from peers after this long (default: 2 × averaging_timeout)
    """

    def __init__(self, model: torch.nn.Module, spec: pb.RunSpec, dht: hivemind.DHT, *, client_mode: bool = False,
                 load_state_timeout: float | None = None):
        rounds, averaging, training = spec.rounds, spec.averaging, spec.training
        if rounds.inner_steps <= 0:
            raise ValueError("RoundOptimizer needs [rounds] inner_steps > 0")
        self.model, self.spec, self.dht = model, spec, dht
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.inner = optimizer_for(training)(self.params)
        self.global_params = [p.detach().to("cpu", torch.float32, copy=True) for p in self.params]
        self.outer = outer_optimizer(self.global_params, spec.rounds)
        self.samples_per_peer = rounds.inner_steps * training.micro_batch_size
        self.max_round_seconds = rounds.max_round_seconds
        self._round_started = time.monotonic()
        # top-k of Δ, the rest (and with sparse4bit the rounding error) kept for later; None: dense Δ
        self.feedback = top_k_feedback(rounds.compression, rounds.topk_density or 1.0)
        self.load_state_timeout = load_state_timeout or 2 * averaging.averaging_timeout
        self.round = 0
        self.samples = self.inner_steps = 0  # this peer's, in the current round
        self.state_loads = 0  # times this peer replaced its state with a peer's (it was behind or out of sync)
        self._lock = threading.Lock()  # guards the global parameters and momentum while a peer downloads them
        self._pending: _Average | None = None  # the overlapped all-reduce of the previous round
        self._needs_sync = False  # the last all-reduce failed while others were there: load state first
        self._missing_update = False  # overlap: joined after the others' pending all-reduce (see load_state...)
        self._group_size = 0
        self._start_hash: str | None = None  # cache of start_hash; None after θ changed
        self._scheduled = None  # a step whose matchmaking started before the round closed (StepControl)
        self._scheduled_round = -1
        self._bytes_counted = 0  # the averager's byte count at the end of the last round
        self._canonical = True  # this peer held the group's θ in its last all-reduce (it serves state first)
        self._loaded_from: str | None = None  # the peer whose state this one loaded last
        self._loaded: tuple[int, str] | None = None  # (round, θ hash) as loaded from it
        self.refuted: set[str] = set()  # peers that served a θ the coordinator did not witness: not asked again
        # a lone trainer of a witnessed run averages with the coordinator's witness (weight 0: the mean is its own Δ),
        # so the witness sees every round; without a witness a lone peer skips the all-reduce
        self._fewest_peers = 1 if spec.witnessed else 2
        self._started = time.perf_counter()
        self.averager = RoundAverager(
            [torch.zeros_like(p) for p in self.global_params], state=self._current_state,
            access=PeerAccessGate(spec.coordinator_public_key, spec.run_id, spec.dht_prefix),
            allreduce_runner=make_runner(spec), dht=dht, prefix=rounds_prefix(spec), start=True,
            min_group_size=min_group_size(spec),
            min_matchmaking_time=averaging.matchmaking_time, request_timeout=min(3.0, averaging.matchmaking_time / 2),
            allreduce_timeout=averaging.averaging_timeout,
            next_chunk_timeout=max(averaging.matchmaking_time, averaging.averaging_timeout / 2),
            compression=COMPRESSIONS[rounds.compression or "none"](), client_mode=client_mode)
        self.tracker = ProgressTracker(dht, spec.dht_prefix, self.samples_per_peer, client_mode=client_mode,
                                       max_refresh_period=PROGRESS_REFRESH, default_refresh_period=PROGRESS_REFRESH,
                                       start=True)

    # ---------------------------------------------------------------- state

    @property
    def grad_group_size(self) -> int:
        """Peers averaged in the last round's update (hivemind.Optimizer's name; 0: none yet or it failed)."""
        return self._group_size

    @property
    def local_epoch(self) -> int:
        """The round this peer trains (hivemind.Optimizer's name, which the rest of the node uses)."""
        return self.round

    def _current_state(self):
        with self._lock:
            momentum = [self.outer.state[p]["momentum_buffer"] for p in self.global_params]
            return dict(round=self.round), [t.clone() for t in self.global_params + momentum]

    def set_state(self, round: int, params: list[torch.Tensor], momentum: list[torch.Tensor] | None = None) -> None:
        """Adopt θ (and the outer momentum; None: zeros) as round ``round``'s start; the model is reset to it."""
        with self._lock:
            for target, source in zip(self.global_params, params, strict=True):
                target.copy_(source)
            momentum = momentum or [torch.zeros_like(p) for p in self.global_params]
            for p, m in zip(self.global_params, momentum, strict=True):
                self.outer.state[p]["momentum_buffer"].copy_(m)
            self.round = round
            self._start_hash = None
        self._reset_model()
        self.averager.state_sharing_priority = round
        self.tracker.report_local_progress(round, 0)

    def load_state_from_peers(self, min_round: int = 0) -> bool:
        """Download θ_r, the outer momentum and the round r ≥ ``min_round`` from the peer with the newest round
        (retrying while peers still serve older rounds, for at most ``load_state_timeout``); True if loaded."""
        deadline = time.monotonic() + self.load_state_timeout
        while True:
            loaded = self.averager.load_state_checked(timeout=self.load_state_timeout, count=len(self.global_params),
                                                      skip=frozenset(self.refuted))
            if loaded is None:
                return False
            metadata, tensors, self._loaded_from = loaded
            count = len(self.global_params)
            if not isinstance(metadata, dict) or len(tensors) != 2 * count or any(
                    t.shape != p.shape for t, p in zip(tensors, self.global_params * 2, strict=True)):
                logger.warning("a peer served a state of the wrong shape; ignored")
                return False
            served = int(metadata.get("round", 0))
            if served >= min_round:
                break
            if time.monotonic() > deadline:
                logger.warning("peers serve round %d, this peer needs round %d; keeping its own", served, min_round)
                return False
            time.sleep(1.0)
        self.set_state(served, tensors[:count], tensors[count:])
        self._loaded = (served, self.start_hash)
        self.state_loads += 1
        if self._pending is not None and self._pending.round != self.round - 1:
            _cancel(self._pending.control)
            self._pending = None  # an all-reduce of an older round no longer applies
        # with overlap, the peers apply the average of round r-1 at the end of round r; a peer that did not take
        # part in it cannot, and loads the state once more after its first round (keeping that round's all-reduce)
        self._missing_update = self.spec.rounds.overlap and self.round > 0 and self._pending is None
        logger.info("loaded round %d's state from a peer", self.round)
        return True

    def check_state(self, expected: str) -> bool:
        """The coordinator published ``expected`` as the hash of this round's θ (its witness computed it): keep θ
        if it matches, else load the state from a peer that serves exactly that θ (the peer this one loaded from
        before is not asked again). True if this peer now holds it; False: no peer serves it any more (the swarm
        moved on), and the next :meth:`begin_round` loads the swarm's newest state from the peers not refuted, to be
        checked against that round's published hash (do not train from a refused θ)."""
        if not expected or self.start_hash == expected:
            return True
        logger.warning("round %d: this peer's θ %s… is not the one the coordinator witnessed (%s…); loading that one",
                       self.round, self.start_hash[:12], expected[:12])
        if self._loaded_from is not None and self._loaded == (self.round, self.start_hash):
            self.refuted.add(self._loaded_from)  # the θ it served (not one this peer stepped to since: seen, a
            # joiner's own outer step after a round it missed blamed the honest peer it had loaded from)
        count = len(self.global_params)
        loaded = self.averager.load_state_checked(timeout=self.load_state_timeout, count=count, expect=expected,
                                                  skip=frozenset(self.refuted))
        if loaded is None or not isinstance(loaded[0], dict) or int(loaded[0].get("round", -1)) != self.round \
                or len(loaded[1]) != 2 * count:
            logger.warning("round %d: no peer serves the witnessed θ %s… any more; catching up with the swarm",
                           self.round, expected[:12])
            self._needs_sync = True
            return False
        metadata, tensors, self._loaded_from = loaded
        self.set_state(self.round, tensors[:count], tensors[count:])
        self._loaded = (self.round, self.start_hash)
        self.state_loads += 1
        logger.info("round %d: loaded the witnessed θ from peer %s", self.round, self._loaded_from)
        return True

    def _reset_model(self) -> None:
        with torch.no_grad():
            for p, g in zip(self.params, self.global_params, strict=True):
                p.copy_(g.to(p.device, p.dtype))

    # ---------------------------------------------------------------- a round

    def begin_round(self) -> int:
        """Catch up with the swarm if this peer is behind or fell out of sync; returns the round to train."""
        swarm_round = self.tracker.global_epoch
        if swarm_round > self.round or self._needs_sync:
            if not self.load_state_from_peers(min_round=self.round) and swarm_round > self.round:
                logger.warning("the swarm is at round %d, no peer served its state: continuing from round %d's "
                               "parameters at round %d", swarm_round, self.round, swarm_round)
                self.round = swarm_round
                self.tracker.report_local_progress(self.round, 0)
            self._needs_sync = False
        self.samples = self.inner_steps = 0
        self._round_started = time.monotonic()
        return self.round

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=True)

    def inner_step(self, batch_size: int) -> None:
        """One inner AdamW step on the gradient in ``param.grad``; counts ``batch_size`` samples to the round."""
        self.inner.step()
        self.samples += batch_size
        self.inner_steps += 1
        self.tracker.report_local_progress(self.round, self.samples)
        self._maybe_schedule()

    def _maybe_schedule(self) -> None:
        """Start matchmaking for this round's all-reduce before the round closes, as hivemind.Optimizer does for its
        gradients: once the swarm's estimated time to the round's end is within ``matchmaking_time``, a step is
        scheduled for that moment (every peer estimates it from the same progress records), to run when
        :meth:`end_round` has put the pseudo-gradient in and triggers it."""
        if self._scheduled is not None or (self._pending is not None and self._pending.control is not None
                                           and not self._pending.control.done()):
            return  # one all-reduce at a time per averager
        progress, averaging = self.tracker.global_progress, self.spec.averaging
        if progress.num_peers < self._fewest_peers or progress.epoch != self.round:
            return
        rate = self.tracker.performance_ema.samples_per_second * progress.num_peers
        eta = max(self.samples_per_peer * progress.num_peers - progress.samples_accumulated, 0) / max(rate, 1e-9)
        if self.max_round_seconds:
            eta = min(eta, max(self.max_round_seconds - (time.monotonic() - self._round_started), 0.0))
        if eta > averaging.matchmaking_time:
            return
        self._scheduled = self._matchmake(
            scheduled_time=get_dht_time() + max(eta, 1.0), weight=1.0, require_trigger=True)
        self._scheduled_round = self.round

    def round_closed(self) -> bool:
        """Whether the swarm has trained this round's samples, the round's time is up (``max_round_seconds``) or
        the swarm moved on to a later round (a peer whose time was up closes it for all)."""
        progress = self.tracker.global_progress
        if progress.epoch > self.round:
            return True
        if self.max_round_seconds and time.monotonic() - self._round_started >= self.max_round_seconds:
            return True
        return progress.samples_accumulated >= self.samples_per_peer * max(progress.num_peers, 1)

    def wait_for_round_end(self, stop: threading.Event, stall_seconds: float = 3 * PROGRESS_REFRESH + 1) -> None:
        """This peer has no more work this round: wait until the round closes, or until the swarm's samples stop
        growing for ``stall_seconds`` (every peer ran out of work: the data is smaller than a round)."""
        last, since = -1, time.monotonic()
        while not stop.is_set() and not self.round_closed():
            samples = self.tracker.global_progress.samples_accumulated
            if samples != last:
                last, since = samples, time.monotonic()
            elif time.monotonic() - since > stall_seconds:
                logger.info("round %d: no peer has work left (%d samples); closing it", self.round, samples)
                return
            stop.wait(0.2)

    def end_round(self) -> RoundResult:
        """Average the pseudo-gradients and take the outer step; the model then holds the next round's θ."""
        started = time.perf_counter()
        delta = [g - p.detach().to("cpu", torch.float32) for g, p in zip(self.global_params, self.params, strict=True)]
        closed, samples, steps = self.round, self.samples, self.inner_steps
        peers = self.tracker.global_progress.num_peers
        sent = self.feedback(delta) if self.feedback is not None else delta
        if self.spec.rounds.overlap:
            # the previous round's average is read out of the averager before this round's pseudo-gradient goes in
            previous, self._pending = self._pending, None
            averaged, group_size = self._finish_average(previous) if previous is not None else (None, 0)
            if previous is None and self._missing_update:
                self._needs_sync, self._missing_update = True, False
            self._pending = self._start_average(sent, samples, peers)
        else:
            averaged, group_size = self._finish_average(self._start_average(sent, samples, peers))
        if averaged is not None and samples == 0 and group_size <= 1 and not self.spec.rounds.overlap:
            # it trained nothing and averaged with no one (a joiner whose first round closed at once): an outer step
            # of its own would move θ by the momentum alone, to a θ no other peer holds; it loads the swarm's instead
            averaged, self._needs_sync = None, True
        self._group_size = group_size
        if averaged is not None:
            with self._lock:
                outer_step(self.outer, self.global_params, averaged)
                self._start_hash = None
        self.round = closed + 1
        self.averager.state_sharing_priority = self.round + (0.5 if self._canonical else 0.0)
        self._reset_model()
        with self.tracker.pause_updates():
            self.tracker.update_epoch(self.round)
        return RoundResult(round=closed, samples=samples, inner_steps=steps, group_size=group_size,
                           applied=averaged is not None, bytes_sent=self._bytes_since_last_round(),
                           sync_seconds=time.perf_counter() - started, delta=delta)

    @property
    def start_hash(self) -> str:
        """SHA-256 of the global parameters θ_r (hex): equal on two peers exactly when they hold the same θ_r."""
        if self._start_hash is None:
            with self._lock:
                self._start_hash = state_hash(self.global_params)
        return self._start_hash

    def _bytes_since_last_round(self) -> int:
        total = self.averager.bytes_sent
        sent, self._bytes_counted = total - self._bytes_counted, total
        return sent

    def _start_average(self, delta: list[torch.Tensor], samples: int, peers: int) -> _Average:
        """Start the all-reduce of ``delta`` in the background (alone: nothing to start)."""
        pending = _Average(round=self.round, delta=delta, start_hash=self.start_hash)
        scheduled, self._scheduled = self._scheduled, None
        if scheduled is not None and (scheduled.done() or self._scheduled_round != self.round
                                      or peers < self._fewest_peers):
            _cancel(scheduled)
            scheduled = None
        if peers < self._fewest_peers:
            return pending
        with self.averager.get_tensors() as tensors:
            for t, d in zip(tensors, delta, strict=True):
                t.copy_(d)
        if scheduled is not None:  # matchmaking began before the round closed: let it run with these tensors
            scheduled.weight = float(max(samples, 1))
            scheduled.allow_allreduce()
            pending.control = scheduled
            return pending
        pending.control = self._matchmake(weight=float(max(samples, 1)))
        return pending

    def _matchmake(self, **step_kwargs):
        """Start this round's all-reduce (hivemind ``StepControl``), matched only with peers at the same round.

        The group key carries the round (its low 8 bits as hivemind's group bits): with overlap, a peer's all-reduce
        of round r can still look for a group while a late joiner already averages round r+1; one group of both
        would mix two rounds' pseudo-gradients and make the older peers look out of sync (seen in
        tests/test_rounds.py). hivemind re-derives the bits after each group, so they are set before every step.
        """
        averaging = self.spec.averaging
        self.averager.set_group_bits(format(self.round % 256, "08b"))
        return self.averager.step(wait=False, timeout=averaging.matchmaking_time + averaging.averaging_timeout,
                                  gather=dict(round=self.round, theta=self.start_hash), **step_kwargs)

    def _finish_average(self, pending: _Average) -> tuple[list[torch.Tensor] | None, int]:
        """Wait for an all-reduce; returns (the average, or None if it failed; the group size)."""
        if pending.control is None:
            return pending.delta, 1
        try:
            gathered = pending.control.result()
        except Exception as e:  # hivemind raises what its matchmaking or all-reduce raised
            gathered = None
            if self.tracker.global_progress.num_peers <= 1:
                logger.info("no other peer to average with: this peer's own pseudo-gradient is applied")
                return pending.delta, 1
            logger.warning("round %d: the all-reduce failed (%r); no outer step from it", pending.round, e)
        if not gathered:
            self._needs_sync = True
            return None, 0
        with self.averager.get_tensors() as tensors:
            averaged = [t.clone() for t in tensors]
        # Every member computes the same outcome from the same gathered data (group_outcome). A member whose θ_r
        # differs from the group's (it averaged alone while others were there) loads the state at the next round
        # start, from a canonical peer (they announce a higher priority).
        outcome = group_outcome(gathered, self.spec)
        self._canonical = outcome.canonical == (pending.round, pending.start_hash)
        if not self._canonical:
            logger.warning("round %d: this peer's θ differs from the group's; it loads the state next round",
                           pending.round)
            self._needs_sync = True
        if not outcome.usable:
            logger.warning("round %d: %d trainer(s) in the group, fewer than %s needs; no outer step from it",
                           pending.round, outcome.trainers, self.spec.averaging.reducer)
            return None, outcome.trainers
        return averaged, outcome.trainers

    def shutdown(self) -> None:
        for control in (self._scheduled, self._pending.control if self._pending is not None else None):
            _cancel(control)
        self.tracker.shutdown()
        self.averager.shutdown()
