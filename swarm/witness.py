"""The coordinator's witness of a rounds run: a weight-0 member of every round's all-reduce.

A node's word moves nothing: not the run's round, not what a checkpoint holds. The witness, run by the
coordinator's checkpointer process, takes part in each round's all-reduce like a volunteer but sends a zero
pseudo-gradient with weight 0 (bandwidth 0: it reduces no part either), so the average every member receives is
the trainers' alone — and it receives the same bytes they do. It applies the same outer step to the θ_r it holds
and so holds θ_{r+1} itself. It serves that state to loads that check θ against the published hash, after every
trainer (:data:`~omi.swarm.round_averager.WITNESS_PRIORITY`), so the witnessed θ can be had even when no trainer
holds it::

    witness = RoundWitness(dht, spec, model)
    while not stop.is_set():
        seen = witness.follow_round(stop)          # one round: join, receive Δ̄, apply the outer step
        if seen is not None and seen.confirmed:
            publish(seen.round, seen.state_hash)   # the run's round and the state hash late joiners check

**Confirmed state.** The witness starts from θ_0 (every peer builds it from the RunSpec's seed). A round's group
gathers each member's (round, hash of θ_r); when the group's canonical θ_r (the one most trainers hold,
:func:`omi.swarm.consistency.group_outcome`) is the witness's own, the θ_{r+1} it computes is *confirmed*: the run's
round moves to r+1 and its hash is published. When the witness missed a round (restarted, not matched, the swarm
split) or its θ is not the group's, it loads the state of the round at least half the trainers report (the lower
median of their progress records: one liar cannot move it) from a peer, skipping peers whose state a group
refuted before, and holds it unconfirmed until a group trained from it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import hivemind
import torch
from hivemind.averaging.control import AveragingStage
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.utils.timed_storage import get_dht_time
from omi.protos import pb
from omi.swarm.consistency import group_outcome
from omi.swarm.diloco import GlobalState
from omi.swarm.follower import add_progress_validators, read_progress
from omi.swarm.round_averager import WITNESS_PRIORITY, cancel_step, make_round_averager

logger = logging.getLogger(__name__)

POLL = 0.5  # seconds between two looks at the step and the swarm's progress


def trainer_rounds(dht: hivemind.DHT, spec: pb.RunSpec) -> list[int]:
    """The round each training peer reports in its progress record (hivemind's ``epoch``)."""
    return [int(record.epoch) for record in read_progress(dht, spec)]


def seconds_to_round_end(records: list[LocalTrainingProgress], spec: pb.RunSpec, round_number: int) -> float:
    """When the trainers' records say round ``round_number`` closes (as each trainer estimates it: H micro-batches
    per trainer at the rates they report); inf when no trainer reports that round.

    Every record of the round counts, a peer that has not trained a step yet too (as the trainers' own clocks count
    it). Known cost: a trainer that closed the round before joiners reported waits in its all-reduce until the
    others' extrapolated samples cover the joiners' share (seen: 20-25 s of a three-peer swarm's round 0). Leaving
    them out was tried (2026-12-07): in one of two suite runs the witness then confirmed a θ no trainer started
    from (tests/test_rounds.py); not shown to be the cause, but not kept."""
    at_round = [r for r in records if r.epoch == round_number]
    if not at_round:
        return float("inf")
    now = get_dht_time()
    target = spec.rounds.inner_steps * spec.training.micro_batch_size * len(at_round)
    done = sum(r.samples_accumulated + max(0.0, now - r.time) * r.samples_per_second for r in at_round)
    return max(target - done, 0.0) / max(sum(r.samples_per_second for r in at_round), 1e-9)


def swarm_round(rounds: list[int]) -> int | None:
    """The round at least half the trainers reached (the lower median): one peer's record cannot move it.

    >>> swarm_round([5, 6, 4_000_000_000]), swarm_round([5, 4_000_000_000]), swarm_round([])
    (6, 5, None)
    """
    return sorted(rounds)[(len(rounds) - 1) // 2] if rounds else None


@dataclass
class Witnessed:
    """What the witness holds after :meth:`RoundWitness.follow_round`."""

    round: int  # the round whose start state θ the witness now holds
    state_hash: str  # SHA-256 of that θ (omi.swarm.diloco.theta_hash)
    confirmed: bool  # computed from a θ_r the round's group trained from (else: loaded from a peer, unconfirmed)
    trainers: int  # trainers in the group the witness averaged with (0: it loaded the state instead)


class RoundWitness:
    """The coordinator's weight-0 member of a rounds run's all-reduces; create it in the main thread.

    :param dht: the witness's DHT of the run (its token is the coordinator's own)
    :param spec: the run (``[rounds]``, ``[averaging]``)
    :param model: built with ``omi.models.build_for_spec``: its parameters are θ_0
    :param wait: seconds one attempt to join a round's group may take before it is retried
    """

    def __init__(self, dht: hivemind.DHT, spec: pb.RunSpec, model: torch.nn.Module, *, wait: float | None = None):
        averaging = spec.averaging
        self.dht, self.spec = dht, spec
        add_progress_validators(dht, spec)
        # θ_r, the outer momentum, r (its lock guards them while a checkpoint copies θ)
        self.state = GlobalState.initial([p for p in model.parameters() if p.requires_grad], spec.rounds)
        self.confirmed = True
        self.refuted: set[str] = set()  # peers that served a θ no group trained from
        self._loaded_from: str | None = None
        self._round_began, self._round_seconds = time.monotonic(), float("inf")  # when the state's round began
        self.wait = wait or 4 * (averaging.matchmaking_time + averaging.averaging_timeout)
        # bandwidth 0: hivemind gives it no part to reduce; not in client mode, so that it serves the θ it holds to
        # loads that check it against the published hash, last of all peers (a peer whose group failed may find no
        # trainer holding the witnessed θ: seen, two honest peers lost a round that a state forger and the witness
        # averaged, and both then loaded the forger's θ)
        self.averager = make_round_averager(spec, dht, deltas=[torch.zeros_like(p) for p in self.state.theta],
                                            state=self.state.serve, bandwidth=0.0)
        self.averager.state_sharing_priority = WITNESS_PRIORITY

    def snapshot(self) -> Witnessed:
        with self.state.lock:
            return Witnessed(self.state.round, self.state.hash(), self.confirmed, 0)

    def copy_into(self, model: torch.nn.Module) -> Witnessed:
        """Put the θ the witness holds into ``model`` (for a checkpoint); returns which θ that is."""
        with self.state.lock, torch.no_grad():
            for target, p in zip([p for p in model.parameters() if p.requires_grad], self.state.theta, strict=True):
                target.copy_(p.to(target.device, target.dtype))
            return self.snapshot()

    def follow_round(self, stop: threading.Event) -> Witnessed | None:
        """Take part in the current round's all-reduce (or catch up with the swarm); returns what it holds then,
        or None when nothing changed (no group yet, or ``stop`` was set)."""
        r, held = self.state.round, self.state.hash()
        # matchmaking starts when the trainers' does (once the round is within matchmaking_time of its end): a search
        # begun earlier looks for leaders only every matchmaking_time, and may find this round's one too late
        while True:
            records = read_progress(self.dht, self.spec)
            ahead = swarm_round([int(record.epoch) for record in records])
            if ahead is not None and ahead > r:
                logger.warning("round %d closed without the witness; the swarm is at round %d", r, ahead)
                return self._catch_up(ahead)
            # the trainers' records of a new round appear only after their first inner steps: until then the last
            # round's length says when this one ends
            eta = min(seconds_to_round_end(records, self.spec, r),
                      self._round_began + self._round_seconds - time.monotonic())
            if eta <= 2 * self.spec.averaging.matchmaking_time + POLL:
                break
            if stop.wait(POLL):
                return None
        self.averager.set_group_bits(format(r % 256, "08b"))
        control = self.averager.step(gather=dict(round=r, theta=held, witness=True), weight=0.0,
                                     scheduled_time=get_dht_time() + self.wait - 1.0, timeout=self.wait, wait=False)
        while not control.done():
            if stop.wait(POLL):
                cancel_step(control)
                return None
            if control.stage != AveragingStage.LOOKING_FOR_GROUP:
                continue  # in a group: the trainers may finish the all-reduce before this (client) peer does
            ahead = swarm_round(trainer_rounds(self.dht, self.spec))
            if ahead is not None and ahead > r:  # the round closed without the witness
                cancel_step(control)
                logger.warning("round %d closed without the witness; the swarm is at round %d", r, ahead)
                return self._catch_up(ahead)
        try:
            gathered = control.result()
        except Exception as e:  # no group within the wait: try again (the swarm may not have started)
            logger.info("round %d: the witness found no group (%r); trying again", r, e)
            return None
        outcome = group_outcome(gathered or {}, self.spec)
        if outcome.canonical != (r, held):
            logger.warning("round %d: the group trained from θ %s…, the witness holds %s…", r,
                           (outcome.canonical or (r, "?"))[1][:12], held[:12])
            if self._loaded_from is not None:
                self.refuted.add(self._loaded_from)
            return self._catch_up(r + 1)
        with self.averager.get_tensors() as tensors:
            averaged = [t.clone() for t in tensors]
        with self.state.lock:
            self.state.advance(averaged if outcome.usable else None)
            self.confirmed = True
        self._loaded_from = None
        now = time.monotonic()
        self._round_seconds, self._round_began = now - self._round_began, now
        seen = Witnessed(self.state.round, self.state.hash(), True, outcome.trainers)
        logger.info("round %d witnessed: %d trainer(s)%s; round %d starts from θ %s…", r, outcome.trainers,
                    "" if outcome.usable else " (too few for the reducer: no outer step)", seen.round,
                    seen.state_hash[:12])
        return seen

    def _catch_up(self, least: int) -> Witnessed | None:
        """Load the state of the round the trainers are at (≥ ``least``) from a peer no group refuted."""
        target = swarm_round(trainer_rounds(self.dht, self.spec))
        if target is None or target < least:
            return None
        loaded = self.averager.download_state(self.state, timeout=self.wait, skip=self.refuted)
        if loaded is None:
            logger.warning("no peer served the state of round %d", target)
            return None
        served, peer = loaded
        if served.round != target:
            logger.warning("peer %s served round %d, the trainers are at round %d; not taken", peer, served.round,
                           target)
            return None
        with self.state.lock:
            self.state.load(served)
            self.confirmed = False
        self._loaded_from = peer
        self._round_began = time.monotonic()
        logger.info("loaded round %d's state from peer %s (unconfirmed until a group trains from it)", served.round,
                    peer)
        return Witnessed(served.round, self.state.hash(), False, 0)

    def shutdown(self) -> None:
        self.averager.shutdown()
