"""The rules of a round, in process: the one predicate that decides an outer step (every branch), the group's
outcome, refuted peers, the global state served and loaded, and one round's all-reduce against a stand-in averager."""

import contextlib
import itertools

import pytest
import torch
from hivemind.averaging.control import AveragingStage
from omi.protos import pb
from omi.swarm.consistency import Decision, Ended, Provenance, group_outcome, should_apply
from omi.swarm.diloco import GlobalState, outer_optimizer, outer_step, pseudo_gradient, read_served, theta_hash
from omi.swarm.round_averager import RoundAllReduce

ROUNDS = pb.RoundsSpec(inner_steps=5, outer_learning_rate=0.7, outer_momentum=0.9, outer_nesterov=True)


def decide(ended: Ended, *, peers: int = 3, samples: int = 40, overlap: bool = False, trainers: int = 3,
           usable: bool = True, canonical: bool = True) -> tuple[bool, bool, int]:
    """(apply, resync, group size) of :func:`should_apply`; every decision says why."""
    decision = should_apply(ended, peers=peers, samples=samples, overlap=overlap, trainers=trainers, usable=usable,
                            canonical=canonical)
    assert isinstance(decision, Decision) and decision.reason
    return decision.apply, decision.resync, decision.group_size


# ------------------------------------------------------------------ should_apply, one test per branch


def test_a_canonical_usable_group_applies_its_average():
    assert decide(Ended.GROUP) == (True, False, 3)


def test_the_first_round_with_overlap_has_nothing_to_apply_and_stays():
    assert decide(Ended.NONE, overlap=True) == (False, False, 0)


def test_a_peer_that_missed_the_previous_rounds_all_reduce_applies_nothing_and_loads_again():
    assert decide(Ended.MISSED, overlap=True) == (False, True, 0)


def test_a_failed_all_reduce_among_others_applies_nothing_and_loads_the_state():
    assert decide(Ended.FAILED, peers=2) == (False, True, 0)


def test_a_peer_that_trained_nothing_while_others_trained_sat_out_and_loads_their_state():
    # a joiner that loaded the state as the round closed: no step of its own, no zero average, the others' θ next
    assert decide(Ended.SAT_OUT, samples=0) == (False, True, 0)


@pytest.mark.parametrize("ended", [Ended.ALONE, Ended.FAILED])
def test_a_peer_alone_in_the_swarm_applies_its_own_pseudo_gradient(ended):
    assert decide(ended, peers=1) == (True, False, 1)


@pytest.mark.parametrize("ended", [Ended.ALONE, Ended.FAILED])
def test_a_peer_that_trained_nothing_and_averaged_with_no_one_loads_the_swarms_state(ended):
    assert decide(ended, peers=1, samples=0) == (False, True, 1)


def test_with_overlap_a_lone_peer_applies_its_previous_rounds_delta_even_after_an_empty_round():
    # the Δ applied is the previous round's: this round's samples say nothing about it
    assert decide(Ended.ALONE, peers=1, samples=0, overlap=True) == (True, False, 1)


def test_a_lone_trainer_with_the_witness_that_trained_nothing_loads_the_swarms_state():
    assert decide(Ended.GROUP, trainers=1, samples=0) == (False, True, 1)
    assert decide(Ended.GROUP, trainers=1, samples=8) == (True, False, 1)


def test_too_few_trainers_for_the_reducer_apply_nothing_and_load_only_when_out_of_sync():
    assert decide(Ended.GROUP, trainers=2, usable=False) == (False, False, 2)
    assert decide(Ended.GROUP, trainers=2, usable=False, canonical=False) == (False, True, 2)


def test_a_peer_whose_theta_is_not_the_groups_applies_the_average_and_loads_the_state_next_round():
    assert decide(Ended.GROUP, canonical=False) == (True, True, 3)


def test_no_decision_applies_a_step_without_an_all_reduce_nor_keeps_a_failed_peer_in_the_swarm():
    for ended, peers, samples, overlap, usable, canonical in itertools.product(
            Ended, (1, 3), (0, 8), (False, True), (False, True), (False, True)):
        apply, resync, _ = decide(ended, peers=peers, samples=samples, overlap=overlap, usable=usable,
                                  canonical=canonical)
        if ended in (Ended.NONE, Ended.MISSED, Ended.SAT_OUT):
            assert not apply
        if ended is Ended.FAILED and peers > 1 or ended in (Ended.MISSED, Ended.SAT_OUT) \
                or ended is Ended.GROUP and not canonical:
            assert resync, (ended, peers, samples, overlap, usable, canonical)


# ------------------------------------------------------------------ group outcome, refuted peers


def test_the_group_trained_from_the_newest_round_then_from_the_theta_most_trainers_hold():
    mean = pb.RunSpec(averaging=pb.AveragingSpec(reducer="mean"))
    outcome = group_outcome({"a": dict(round=4, theta="old"), "b": dict(round=5, theta="x"),
                             "c": dict(round=5, theta="y"), "d": dict(round=5, theta="y"),
                             "w": dict(round=5, theta="x", witness=True), "junk": b"not a dict"}, mean)
    assert outcome.canonical == (5, "y") and outcome.trainers == 4 and outcome.usable
    assert group_outcome({"a": dict(round=5, theta="x"), "w": dict(round=5, theta="z", witness=True)},
                         mean).canonical == (5, "x")  # the witness's entry is not a vote


def test_a_peer_is_refuted_only_while_this_peer_holds_the_theta_it_served():
    provenance = Provenance()
    assert provenance.refute(5, "h") is None  # nothing loaded: no one to blame
    provenance.loaded("QmA", 5, "h")
    assert provenance.refute(6, "h2") is None and provenance.refuted == set()  # it stepped since
    assert provenance.refute(5, "h") == "QmA" and provenance.refuted == {"QmA"}
    provenance.loaded("QmB", 6, "h6")
    assert provenance.refute(6, "h6") == "QmB" and provenance.refuted == {"QmA", "QmB"}


# ------------------------------------------------------------------ the global state


def test_the_served_state_round_trips_and_a_state_of_another_model_is_refused():
    params = [torch.randn(3, 2), torch.randn(4)]
    state = GlobalState.initial(params, ROUNDS)
    state.advance([torch.ones(3, 2), torch.ones(4)])
    metadata, tensors = state.serve()
    other = GlobalState.initial([torch.zeros(3, 2), torch.zeros(4)], ROUNDS)
    other.load(other.read(metadata, tensors))
    assert other.round == 1 and other.hash() == state.hash()
    assert all(torch.equal(a, b) for a, b in zip(other.momentum, state.momentum, strict=True))
    assert read_served(metadata, tensors[:3], [t.shape for t in params]) is None  # momentum missing
    assert read_served(metadata, tensors[::-1], [t.shape for t in params]) is None  # shapes swapped
    assert read_served({}, tensors, [t.shape for t in params]) is None  # no round
    assert read_served([1], tensors, [t.shape for t in params]) is None


def test_the_outer_step_is_the_optimizers_and_no_step_keeps_theta_and_its_hash():
    params = [torch.randn(5)]
    state = GlobalState.initial(params, ROUNDS)
    before = state.hash()
    state.advance(None)
    assert state.round == 1 and state.hash() == before == theta_hash(params)
    reference = [params[0].clone()]
    outer = outer_optimizer(reference, ROUNDS)
    local = [params[0] - 0.1]
    averaged = pseudo_gradient(state.theta, local)
    outer_step(outer, reference, averaged)
    state.advance(averaged)
    assert torch.equal(state.theta[0], reference[0]) and state.hash() == theta_hash(reference) != before


def test_set_adopts_theta_with_zero_momentum_and_a_new_hash():
    state = GlobalState.initial([torch.zeros(2)], ROUNDS)
    state.advance([torch.ones(2)])
    state.set(7, [torch.full((2,), 3.0)])
    assert state.round == 7 and state.hash() == theta_hash([torch.full((2,), 3.0)])
    assert torch.equal(state.momentum[0], torch.zeros(2))


# ------------------------------------------------------------------ one round's all-reduce, on a stand-in averager


class FakeControl:
    """hivemind's StepControl as RoundAllReduce sees it: done at once, or after ``polls`` looks at ``done``."""

    def __init__(self, gathered=None, error=None, stage=AveragingStage.FINISHED, polls=0):
        self.gathered, self.error, self.weight, self.triggered, self.cancelled = gathered, error, None, False, False
        self.stage, self.polls = stage, polls

    def done(self):
        self.polls -= 1
        return self.cancelled or self.polls < 0

    def allow_allreduce(self):
        self.triggered = True

    def cancel(self):
        self.cancelled = True

    def result(self):
        if self.error is not None:
            raise self.error
        return self.gathered


class FakeAverager:
    """What RoundAllReduce uses of the round averager: group bits, ``step``, the shared tensors (here the group's
    average is twice what this peer put in)."""

    def __init__(self, control: FakeControl):
        self.control, self.tensors, self.steps = control, [torch.zeros(2)], []

    def set_group_bits(self, bits):
        self.bits = bits

    def step(self, **kwargs):
        self.steps.append(kwargs)
        return self.control

    @contextlib.contextmanager
    def get_tensors(self):
        yield self.tensors
        self.tensors = [t * 2 for t in self.tensors]


SPEC = pb.RunSpec(averaging=pb.AveragingSpec(matchmaking_time=2.0, averaging_timeout=10.0, reducer="mean"))


def test_a_scheduled_all_reduce_runs_with_the_delta_put_in_and_returns_the_groups_outcome():
    control = FakeControl(gathered={"a": dict(round=258, theta="h"), "b": dict(round=258, theta="h")})
    averager = FakeAverager(control)
    average = RoundAllReduce(averager, SPEC, 258, "h")
    average.schedule(at=100.0)
    assert averager.steps[0]["require_trigger"] and averager.steps[0]["gather"] == dict(round=258, theta="h")
    assert averager.bits == "00000010"  # round 258's low 8 bits: only peers of the same round meet
    average.start([torch.ones(2)], weight=40.0)
    assert control.triggered and control.weight == 40.0 and len(averager.steps) == 1
    finished = average.finish()
    assert finished.ended is Ended.GROUP and finished.canonical and finished.trainers == 2 and finished.usable
    assert torch.equal(finished.average[0], torch.full((2,), 2.0))


def test_a_peer_whose_theta_is_not_the_groups_learns_it_from_the_gathered_data():
    control = FakeControl(gathered={"a": dict(round=3, theta="h"), "b": dict(round=3, theta="other"),
                                    "c": dict(round=3, theta="other")})
    average = RoundAllReduce(FakeAverager(control), SPEC, 3, "h")
    average.start([torch.ones(2)], weight=8.0)
    finished = average.finish()
    assert finished.ended is Ended.GROUP and not finished.canonical and finished.trainers == 3


def test_an_all_reduce_alone_failed_or_missed_reports_so():
    alone = RoundAllReduce(FakeAverager(FakeControl()), SPEC, 1, "h")
    alone.start([torch.ones(2)], weight=None)
    assert alone.finish().ended is Ended.ALONE and alone.delta is not None
    error = RuntimeError("could not find a group")
    failed = RoundAllReduce(FakeAverager(FakeControl(error=error)), SPEC, 1, "h")
    failed.start([torch.ones(2)], weight=8.0)
    assert failed.finish().ended is Ended.FAILED and failed.finish().error is error
    missed = RoundAllReduce(FakeAverager(FakeControl()), SPEC, 1, "", missed=True)
    assert missed.finish().ended is Ended.MISSED and not missed.running()


def test_a_peer_still_looking_for_a_group_when_the_swarm_moved_on_gives_up_at_once():
    # seen: a straggler that began matchmaking after the others' group formed waited the whole averaging timeout
    looking = FakeControl(stage=AveragingStage.LOOKING_FOR_GROUP, polls=10**6)
    average = RoundAllReduce(FakeAverager(looking), SPEC, 3, "h")
    average.start([torch.ones(2)], weight=8.0)
    looks = iter([False, False, True])
    finished = average.finish(gone=lambda: next(looks))
    assert finished.ended is Ended.FAILED and looking.cancelled and "without this peer" in str(finished.error)
    # in a group already: it waits for the all-reduce, whatever the swarm does meanwhile
    gathered = {"a": dict(round=3, theta="h"), "b": dict(round=3, theta="h")}
    running = FakeControl(gathered, stage=AveragingStage.RUNNING_ALLREDUCE, polls=3)
    average = RoundAllReduce(FakeAverager(running), SPEC, 3, "h")
    average.start([torch.ones(2)], weight=8.0)
    assert average.finish(gone=lambda: True).ended is Ended.GROUP and not running.cancelled
