"""A RoundOptimizer with no other trainer (one real hivemind DHT peer in this process): the outer step it takes
alone, and the one it must not take; and a joiner that trained nothing while another peer trained."""

import asyncio
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from omi.swarm.follower import add_progress_validators, read_progress
from omi.swarm.rounds import RoundOptimizer, SyncState
from swarm_helpers import dht_peers, make_spec, regression_batch, tiny_model


def _optimizer(peers, coordinator_key):
    spec, _, (dht,) = peers
    spec = make_spec(coordinator_key, inner_steps=5, outer_momentum=0.9, initial_peers=tuple(spec.initial_peers))
    model = tiny_model()
    opt = RoundOptimizer(model, spec, dht)
    # round 3's state as loaded from a peer: θ and an outer momentum that is not zero
    opt.set_state(3, [p.detach().clone() for p in model.parameters()],
                  [torch.full_like(p, 0.01) for p in model.parameters()])
    return model, opt


def test_a_peer_that_trained_nothing_and_averaged_with_no_one_keeps_theta_and_loads_the_swarms(
        tmp_path, coordinator_key):
    # seen in a swarm: two joiners loaded round 5 as it closed, computed no micro-batch, averaged with no one and took
    # an outer step of their own (the momentum alone moved θ), then outvoted the honest peer in round 6's group
    with dht_peers(coordinator_key, tmp_path, count=1) as peers:
        model, opt = _optimizer(peers, coordinator_key)
        try:
            before = [p.clone() for p in opt.global_params]
            assert opt.begin_round() == 3
            result = opt.end_round()  # the round closed before a single inner step
            assert result.samples == 0 and not result.applied
            assert all(torch.equal(a, b) for a, b in zip(before, opt.global_params, strict=True))
            assert opt.sync is SyncState.NEEDS_LOAD  # it loads the swarm's θ at the next round start
        finally:
            opt.shutdown()


def test_a_peer_alone_in_the_swarm_applies_its_own_pseudo_gradient(tmp_path, coordinator_key):
    with dht_peers(coordinator_key, tmp_path, count=1) as peers:
        model, opt = _optimizer(peers, coordinator_key)
        try:
            before = [p.clone() for p in opt.global_params]
            opt.begin_round()
            x, y = regression_batch(torch.Generator().manual_seed(0), 8)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.inner_step(8)
            result = opt.end_round()
            assert result.samples == 8 and result.applied and result.group_size == 1
            assert not all(torch.equal(a, b) for a, b in zip(before, opt.global_params, strict=True))
        finally:
            opt.shutdown()



def test_a_joiner_that_trained_nothing_while_another_trained_sits_out_at_once_and_serves_its_state_last(
        tmp_path, coordinator_key):
    # seen in real swarms (2026-12-07): joiners loaded round r's state as it closed, then waited a whole averaging
    # timeout for a group that had formed without them ("could not find a group"), or two of them grouped and stepped
    # by a zero average to a θ the witness refuted; round after round, for a minute and more
    with dht_peers(coordinator_key, tmp_path, count=1) as peers:
        _, joiner = _optimizer(peers, coordinator_key)
        try:
            joiner.begin_round()
            # what the progress records say as the round closes: another trainer trained the 80 samples of two
            # (two optimizers in one process share hivemind's process-wide key, so one stands in for both: its
            # tracker stops fetching, and the swarm's progress is set)
            joiner.tracker.shutdown()
            joiner.tracker.global_progress = dataclasses.replace(joiner.tracker.global_progress, num_peers=2,
                                                                 samples_accumulated=80)
            assert joiner.round_closed()
            before = [p.clone() for p in joiner.global_params]
            started = time.monotonic()
            result = joiner.end_round()
            waited = time.monotonic() - started
            # no all-reduce was started: it did not wait for matchmaking (2 s here) nor for a timeout
            assert waited < joiner.spec.averaging.matchmaking_time, waited
            assert result.samples == 0 and not result.applied and result.group_size == 0
            assert all(torch.equal(a, b) for a, b in zip(before, joiner.global_params, strict=True))
            assert joiner.sync is SyncState.NEEDS_LOAD and joiner.round == 4
            # it serves θ_3 as round 4 only after any peer still serving round 3: a newcomer loads the others' state
            assert joiner.averager.state_sharing_priority < 3
        finally:
            joiner.shutdown()



def test_a_peer_that_leaves_withdraws_its_progress_record_before_its_dht_goes(tmp_path, coordinator_key):
    # seen: the records of volunteers that had left (kept a minute) closed a newcomer's round before it trained a step
    with dht_peers(coordinator_key, tmp_path, count=2) as peers:
        spec, _, (dht, reader) = peers
        spec = make_spec(coordinator_key, inner_steps=5, initial_peers=tuple(spec.initial_peers))
        add_progress_validators(reader, spec)  # the reader tracks no progress of its own, as the witness
        opt = RoundOptimizer(tiny_model(), spec, dht)
        try:
            opt.begin_round()
            opt.tracker.report_local_progress(0, 8)
            deadline = time.monotonic() + 30
            while not read_progress(reader, spec) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert [r.samples_accumulated for r in read_progress(reader, spec)] == [8]
        finally:
            opt.shutdown()
        dht.shutdown()  # at once, as a volunteer that leaves does
        assert read_progress(reader, spec) == []


class _SlowGets:
    """A DHT whose reads of the progress records hang until ``release`` is set (a loaded or vanished peer)."""

    def __init__(self, dht):
        self.dht, self.release, self.reading = dht, threading.Event(), threading.Event()

    def get(self, *args, **kwargs):
        def slow():
            self.reading.set()
            self.release.wait(30)
            return self.dht.get(*args, **{**kwargs, "return_future": False})

        return asyncio.wrap_future(ThreadPoolExecutor(1).submit(slow))  # awaited in the tracker's event loop

    def __getattr__(self, name):
        return getattr(self.dht, name)


def test_the_round_can_end_while_a_read_of_the_swarms_progress_hangs(tmp_path, coordinator_key):
    # measured in a three-volunteer swarm on 2 cores: with hivemind's ProgressTracker each peer waited 0-5 s per round
    # for its lock (held across every DHT read of the progress records) before it could move to the next round
    with dht_peers(coordinator_key, tmp_path, count=1) as peers:
        model, opt = _optimizer(peers, coordinator_key)
        slow = _SlowGets(opt.tracker.dht)
        try:
            opt.tracker.dht = slow
            assert slow.reading.wait(10), "the tracker never read the swarm's progress"
            time.sleep(0.2)  # the read hangs in the tracker's fetcher now
            assert not opt.tracker.lock_global_progress.locked()
            with opt.tracker.pause_updates():  # what end_round does to move to the next round
                opt.tracker.update_epoch(4)
            assert opt.tracker.global_epoch == 4
            slow.release.set()  # the read returns the records from before the new round: the round stays 4
            time.sleep(1.0)
            assert opt.tracker.global_epoch == 4
        finally:
            slow.release.set()
            opt.tracker.dht = slow.dht
            opt.shutdown()
