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
   averaged Δ and starts round r+1 from θ_{r+1} = OuterStep(θ_r, Δ̄), bitwise the same on every honest peer
   (:mod:`omi.swarm.round_averager` returns every member of a group the same bytes).

A round has three rooms: the algorithm (:mod:`omi.swarm.diloco`: θ, Δ, the outer step, the :class:`GlobalState`),
the consistency rules (:mod:`omi.swarm.consistency`: the group's outcome, refuted peers, :func:`should_apply`) and
the hivemind-facing :class:`RoundOptimizer` here, which runs them; its :meth:`~RoundOptimizer.end_round` shows a
round's end in one sequence.

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

import enum
import logging
import threading
import time
from dataclasses import dataclass

import hivemind
import torch
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils.timed_storage import get_dht_time
from omi.models.optimizer import optimizer_for
from omi.protos import pb
from omi.swarm.compression import top_k_feedback
from omi.swarm.consistency import (
    Decision,
    Ended,
    GroupOutcome,
    Provenance,
    fewest_peers,
    group_outcome,
    min_group_size,
    should_apply,
)
from omi.swarm.diloco import (
    GlobalState,
    ServedState,
    outer_optimizer,
    outer_step,
    pseudo_gradient,
    reset_to,
    theta_hash,
)
from omi.swarm.round_averager import (
    Finished,
    RoundAllReduce,
    RoundAverager,
    make_round_averager,
    make_runner,
    rounds_prefix,
)
from omi.swarm.upstream import RoundProgressTracker, withdraw_progress

__all__ = [
    "GlobalState", "GroupOutcome", "RoundAverager", "RoundOptimizer", "RoundResult", "SyncState", "group_outcome",
    "make_runner", "min_group_size", "outer_optimizer", "outer_step", "rounds_prefix", "theta_hash",
]

logger = logging.getLogger(__name__)

PROGRESS_REFRESH = 1.0  # at most this many seconds between two reads of the swarm's round progress


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


def _log_decision(round_number: int, finished: Finished, decision: Decision) -> None:
    """Warn when a round's end leaves the plain path (no outer step, or a state to load); say so when a peer steps
    alone."""
    if decision.resync or not (decision.apply or finished.ended is Ended.NONE):
        logger.warning("round %d: %s%s", round_number, decision.reason,
                       f" ({finished.error!r})" if finished.error is not None else "")
    elif finished.ended is not Ended.GROUP and decision.apply:
        logger.info("round %d: %s", round_number, decision.reason)


class RoundClock:
    """When the swarm's round closes, read from hivemind's progress records: once the swarm has trained
    ``H × micro_batch_size`` samples per training peer, the round's time is up (``max_round_seconds``) or the swarm
    moved on to a later round (a peer whose time was up closes it for all).

    :param tracker: hivemind's ``ProgressTracker`` of the run (the training peers' samples and rates)
    :param spec: the run (``[rounds] inner_steps`` and ``max_round_seconds``, ``[training] micro_batch_size``)
    """

    def __init__(self, tracker: ProgressTracker, spec: pb.RunSpec):
        self.tracker = tracker
        self.samples_per_peer = spec.rounds.inner_steps * spec.training.micro_batch_size
        self.max_round_seconds = spec.rounds.max_round_seconds
        self.started = time.monotonic()  # when this peer began its current round

    def closed(self, round_number: int) -> bool:
        """Whether round ``round_number`` is closed."""
        progress = self.tracker.global_progress
        if progress.epoch > round_number:
            return True
        if self.max_round_seconds and time.monotonic() - self.started >= self.max_round_seconds:
            return True
        return progress.samples_accumulated >= self.samples_per_peer * max(progress.num_peers, 1)

    def seconds_left(self) -> float:
        """The swarm's estimate of the time to the round's end (every peer estimates it from the same records)."""
        progress = self.tracker.global_progress
        rate = self.tracker.performance_ema.samples_per_second * progress.num_peers
        eta = max(self.samples_per_peer * progress.num_peers - progress.samples_accumulated, 0) / max(rate, 1e-9)
        if self.max_round_seconds:
            eta = min(eta, max(self.max_round_seconds - (time.monotonic() - self.started), 0.0))
        return eta

    def wait(self, round_number: int, stop: threading.Event, stall_seconds: float) -> None:
        """Wait until round ``round_number`` closes, or until the swarm's samples stop growing for ``stall_seconds``
        (every peer ran out of work: the data is smaller than a round)."""
        last, since = -1, time.monotonic()
        while not stop.is_set() and not self.closed(round_number):
            samples = self.tracker.global_progress.samples_accumulated
            if samples != last:
                last, since = samples, time.monotonic()
            elif time.monotonic() - since > stall_seconds:
                logger.info("round %d: no peer has work left (%d samples); closing it", round_number, samples)
                return
            stop.wait(0.2)


class SyncState(enum.Enum):
    """Whether a trainer's θ is the swarm's, as far as it knows."""

    IN_SYNC = "in sync"  # it trains from the θ it holds (its next group tells whether that is the swarm's)
    NEEDS_LOAD = "needs load"  # its θ may not be the swarm's: it loads the state from a peer at the next round start


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
        rounds, training = spec.rounds, spec.training
        if rounds.inner_steps <= 0:
            raise ValueError("RoundOptimizer needs [rounds] inner_steps > 0")
        self.model, self.spec, self.dht = model, spec, dht
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.inner = optimizer_for(training)(self.params)
        self.state = GlobalState.initial(self.params, rounds)  # θ_r, the outer momentum, r
        # top-k of Δ, the rest (and with sparse4bit the rounding error) kept for later; None: dense Δ
        self.feedback = top_k_feedback(rounds.compression, rounds.topk_density or 1.0)
        self.load_state_timeout = load_state_timeout or 2 * spec.averaging.averaging_timeout
        self.samples = self.inner_steps = 0  # this peer's, in the current round
        self.state_loads = 0  # times this peer replaced its state with a peer's (it was behind or out of sync)
        self.sync = SyncState.IN_SYNC
        self.provenance = Provenance()  # the peer whose state this one loaded last, and the peers refuted
        self._agreed = True  # this peer held its last group's θ_r: it serves its state before peers that did not
        self._next: RoundAllReduce | None = None  # this round's all-reduce, when matchmaking began before its end
        self._previous: RoundAllReduce | None = None  # with overlap: the previous round's, running in the background
        self._bytes_counted = 0  # the averager's byte count at the end of the last round
        self.averager = make_round_averager(spec, dht, deltas=[torch.zeros_like(p) for p in self.state.theta],
                                            state=self.state.serve, client_mode=client_mode)
        self.tracker = RoundProgressTracker(dht, spec.dht_prefix, rounds.inner_steps * training.micro_batch_size,
                                            client_mode=client_mode, max_refresh_period=PROGRESS_REFRESH,
                                            default_refresh_period=PROGRESS_REFRESH, start=True)
        self.clock = RoundClock(self.tracker, spec)

    # ---------------------------------------------------------------- state

    @property
    def round(self) -> int:
        return self.state.round

    @property
    def global_params(self) -> list[torch.Tensor]:
        """θ_r, on the CPU in float32."""
        return self.state.theta

    @property
    def start_hash(self) -> str:
        """SHA-256 of the global parameters θ_r (hex): equal on two peers exactly when they hold the same θ_r."""
        return self.state.hash()

    @property
    def holds_served_state(self) -> bool:
        """Whether θ_r is as a peer served it (loaded, not stepped since): in a witnessed run it is to be checked
        against the hash the coordinator publishes for the round before it is trained from."""
        return self.provenance.source is not None and self.provenance.source[1:] == (self.round, self.start_hash)

    def set_state(self, round: int, params: list[torch.Tensor], momentum: list[torch.Tensor] | None = None) -> None:
        """Adopt θ (and the outer momentum; None: zeros) as round ``round``'s start; the model is reset to it."""
        self.state.set(round, params, momentum)
        reset_to(self.params, self.state.theta)
        self.averager.state_sharing_priority = round
        self.tracker.report_local_progress(round, 0)

    def _adopt(self, served: ServedState, peer: str) -> None:
        """Take a state a peer served."""
        self.set_state(served.round, served.theta, served.momentum)
        self.provenance.loaded(peer, self.round, self.start_hash)
        self.state_loads += 1

    def load_state_from_peers(self, min_round: int = 0) -> bool:
        """Download θ_r, the outer momentum and the round r ≥ ``min_round`` from the peer with the newest round
        (retrying while peers still serve older rounds, for at most ``load_state_timeout``); True if loaded."""
        deadline = time.monotonic() + self.load_state_timeout
        while True:
            loaded = self.averager.download_state(self.state, timeout=self.load_state_timeout,
                                                  skip=self.provenance.refuted)
            if loaded is None:
                return False
            if loaded[0].round >= min_round:
                break
            if time.monotonic() > deadline:
                logger.warning("peers serve round %d, this peer needs round %d; keeping its own", loaded[0].round,
                               min_round)
                return False
            time.sleep(1.0)
        self._adopt(*loaded)
        # with overlap, the peers apply the average of round r-1 at the end of round r: a peer that did not take
        # part in it cannot, and loads the state once more after its first round (keeping that round's all-reduce)
        previous = self._previous
        if previous is not None and previous.round != self.round - 1:
            previous.cancel()  # an all-reduce of an older round no longer applies
            previous = None
        if previous is None and self.spec.rounds.overlap and self.round > 0:
            previous = RoundAllReduce(self.averager, self.spec, self.round - 1, "", missed=True)
        self._previous = previous
        logger.info("loaded round %d's state (θ %s…) from peer %s", self.round, self.start_hash[:12], loaded[1])
        return True

    def check_state(self, expected: str) -> bool:
        """The coordinator published ``expected`` as the hash of this round's θ (its witness computed it): keep θ
        if it matches, else load the state from a peer that serves exactly that θ (the peer this one loaded from
        before is refuted: not asked again). True if this peer now holds it; False: no peer serves it any more (the
        swarm moved on), and the next :meth:`begin_round` loads the swarm's newest state from the peers not refuted,
        to be checked against that round's published hash (do not train from a refused θ)."""
        if not expected or self.start_hash == expected:
            return True
        logger.warning("round %d: this peer's θ %s… is not the one the coordinator witnessed (%s…); loading that one",
                       self.round, self.start_hash[:12], expected[:12])
        self.provenance.refute(self.round, self.start_hash)
        loaded = self.averager.download_state(self.state, timeout=self.load_state_timeout,
                                              skip=self.provenance.refuted, expect=expected)
        if loaded is None or loaded[0].round != self.round:
            logger.warning("round %d: no peer serves the witnessed θ %s… any more; catching up with the swarm",
                           self.round, expected[:12])
            self.sync = SyncState.NEEDS_LOAD
            return False
        self._adopt(*loaded)
        logger.info("round %d: loaded the witnessed θ from peer %s", self.round, loaded[1])
        return True

    # ---------------------------------------------------------------- a round

    def begin_round(self) -> int:
        """Catch up with the swarm if this peer is behind or fell out of sync; returns the round to train."""
        swarm_round = self.tracker.global_epoch
        if swarm_round > self.round or self.sync is SyncState.NEEDS_LOAD:
            if not self.load_state_from_peers(min_round=self.round) and swarm_round > self.round:
                logger.warning("the swarm is at round %d, no peer served its state: continuing from round %d's "
                               "parameters at round %d", swarm_round, self.round, swarm_round)
                self.state.round = swarm_round
                self.tracker.report_local_progress(self.round, 0)
            self.sync = SyncState.IN_SYNC
        self.samples = self.inner_steps = 0
        self.clock.started = time.monotonic()
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
        if self._next is not None or (self._previous is not None and self._previous.running()):
            return  # one all-reduce at a time per averager
        progress = self.tracker.global_progress
        if progress.num_peers < fewest_peers(self.spec) or progress.epoch != self.round:
            return
        eta = self.clock.seconds_left()
        if eta <= self.spec.averaging.matchmaking_time:
            self._next = RoundAllReduce(self.averager, self.spec, self.round, self.start_hash)
            self._next.schedule(at=get_dht_time() + max(eta, 1.0))

    def round_closed(self) -> bool:
        """Whether the swarm closed this round (:class:`RoundClock`)."""
        return self.clock.closed(self.round)

    def wait_for_round_end(self, stop: threading.Event, stall_seconds: float = 3 * PROGRESS_REFRESH + 1) -> None:
        """This peer has no more work this round: wait until the round closes, or until the swarm's samples stop
        growing for ``stall_seconds`` (every peer ran out of work: the data is smaller than a round)."""
        self.clock.wait(self.round, stop, stall_seconds)

    def end_round(self) -> RoundResult:
        """Average the pseudo-gradients and take the outer step; the model then holds the next round's θ."""
        started = time.perf_counter()
        closed, samples, steps = self.round, self.samples, self.inner_steps
        overlap, progress = self.spec.rounds.overlap, self.tracker.global_progress
        peers, others_trained = progress.num_peers, progress.epoch > closed or progress.samples_accumulated > samples
        # 1. Δ = θ_r − θ_local, and what of it is sent (with top-k: the largest entries, the rest fed back)
        delta = pseudo_gradient(self.state.theta, self.params)
        sent = self.feedback(delta) if self.feedback is not None else delta
        # 2. the all-reduce whose average applies now: this round's; with overlap the previous round's, read out of
        #    the averager before this round's Δ goes in and averages through the next round
        if overlap:
            averaged = self._previous
            finished = averaged.finish() if averaged is not None else Finished(Ended.NONE)
            self._previous = self._start_average(sent, samples, peers)
        elif samples == 0 and others_trained:  # nothing to add to the others' average (consistency.Ended.SAT_OUT)
            averaged, finished = None, Finished(Ended.SAT_OUT)
        else:
            averaged = self._start_average(sent, samples, peers)
            finished = averaged.finish(gone=lambda: self.tracker.global_epoch > closed)
        # 3. the decision: every member concludes the same from the group's gathered data (omi.swarm.consistency)
        decision = should_apply(finished.ended, peers=self.tracker.global_progress.num_peers, samples=samples,
                                overlap=overlap, trainers=finished.trainers, usable=finished.usable,
                                canonical=finished.canonical)
        _log_decision(averaged.round if averaged is not None else closed, finished, decision)
        # 4. the outer step: θ_{r+1} = OuterStep(θ_r, Δ̄) with the group's average (alone: its own Δ), or θ_{r+1} = θ_r
        update = (finished.average if finished.ended is Ended.GROUP else averaged.delta) if decision.apply else None
        self.state.advance(update)
        # 5. reset: the model holds θ_{r+1}; the state is served at its new round, first by peers of the group's θ
        if decision.resync:
            self.sync = SyncState.NEEDS_LOAD
        if finished.ended is Ended.GROUP:
            self._agreed = finished.canonical
        # a peer that must load the state serves its own after every peer still at the previous round: it may not
        # hold the swarm's θ at this one
        self.averager.state_sharing_priority = self.round - 2 if decision.resync else \
            self.round + (0.5 if self._agreed else 0.0)
        reset_to(self.params, self.state.theta)
        with self.tracker.pause_updates():
            self.tracker.update_epoch(self.round)
        return RoundResult(round=closed, samples=samples, inner_steps=steps, group_size=decision.group_size,
                           applied=update is not None, bytes_sent=self._bytes_since_last_round(),
                           sync_seconds=time.perf_counter() - started, delta=delta)

    def _start_average(self, delta: list[torch.Tensor], samples: int, peers: int) -> RoundAllReduce:
        """This round's all-reduce of ``delta``, started in the background (alone: nothing to start)."""
        averaging, self._next = self._next, None
        alone = peers < fewest_peers(self.spec)
        if averaging is not None and (alone or not averaging.running() or averaging.round != self.round
                                      or averaging.theta_hash != self.start_hash):
            averaging.cancel()  # scheduled for another round or θ, or it ended already
            averaging = None
        averaging = averaging or RoundAllReduce(self.averager, self.spec, self.round, self.start_hash)
        averaging.start(delta, weight=None if alone else float(max(samples, 1)))
        return averaging

    def _bytes_since_last_round(self) -> int:
        total = self.averager.bytes_sent
        sent, self._bytes_counted = total - self._bytes_counted, total
        return sent

    def shutdown(self) -> None:
        for averaging in filter(None, (self._next, self._previous)):
            averaging.cancel()
        withdraw_progress(self.tracker, timeout=5.0)  # the swarm stops counting this peer's samples at once
        self.averager.shutdown()
