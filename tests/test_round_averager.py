"""The round averager (real hivemind averagers in processes of this one): a step cancelled while it looks for a
group leaves the averager able to average again; its forked process renews torch's thread pool."""

import asyncio
import gc
import multiprocessing
import os
import threading
import time

import torch
from hivemind.averaging.control import AveragingStage
from hivemind.averaging.key_manager import GroupKeyManager
from omi.swarm.averagers import renew_torch_thread_pool
from omi.swarm.round_averager import make_round_averager
from swarm_helpers import dht_peers


def _collect_garbage_while_leaving(monkeypatch) -> None:
    """Make the averager processes forked from now on run the garbage collector while a matchmaking clean-up awaits
    its DHT store (which it always does, for a moment): what a collection that happens to come then does."""
    declare = GroupKeyManager.declare_averager

    async def declare_then_collect(self, group_key, peer_id, expiration_time, looking_for_group=True):
        if not looking_for_group:
            asyncio.get_running_loop().call_soon(gc.collect)
        return await declare(self, group_key, peer_id, expiration_time, looking_for_group)

    monkeypatch.setattr(GroupKeyManager, "declare_averager", declare_then_collect)


def test_a_step_cancelled_while_looking_for_a_group_leaves_the_averager_able_to_average(
        tmp_path, coordinator_key, monkeypatch):
    # seen in tests/test_rounds.py: a peer cancelled a step that was looking for a group (the others had averaged the
    # round without it), the collector destroyed hivemind's matchmaking task mid-clean-up with its lock taken, and the
    # peer averaged with no one in any later round
    _collect_garbage_while_leaving(monkeypatch)
    with dht_peers(coordinator_key, tmp_path, count=2) as (spec, _, dhts):
        first, second = (make_round_averager(spec, dht, deltas=[torch.full((4,), float(i))])
                         for i, dht in enumerate(dhts))
        try:
            alone = first.step(wait=False, timeout=30.0)
            deadline = time.monotonic() + 10
            while alone.stage is not AveragingStage.LOOKING_FOR_GROUP and time.monotonic() < deadline:
                time.sleep(0.05)
            assert alone.stage is AveragingStage.LOOKING_FOR_GROUP, alone.stage
            time.sleep(0.5)  # it declared itself in the DHT: leaving, it withdraws that
            alone.cancel()
            time.sleep(1.0)
            together = [averager.step(wait=False, timeout=20.0) for averager in (first, second)]
            gathered = [control.result(timeout=30.0) for control in together]
            assert all(gathered), gathered
            assert first.last_group_size == second.last_group_size == 2
            with first.get_tensors() as tensors:
                assert torch.equal(tensors[0], torch.full((4,), 0.5))
        finally:
            first.shutdown()
            second.shutdown()


def _quantize_in_threads_after_fork() -> None:
    renew_torch_thread_pool()  # as the averager's process does first (without it: 15 of 20 children failed here)
    failed, start = [], threading.Barrier(8)

    def quantize() -> None:
        start.wait()
        try:
            torch.quantize_per_tensor(torch.randn(5000), 0.1, 10, torch.quint8).int_repr()
        except RuntimeError as e:
            failed.append(e)

    threads = [threading.Thread(target=quantize) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    os._exit(1 if failed else 0)


def test_a_forked_averager_renews_torchs_thread_pool_before_its_threads_quantize():
    # the averager's executor threads compress parts side by side: in a process forked from one that had quantized,
    # torch renews its thread pool lazily and a second thread asking at once got none ("Invalid thread pool!")
    # this process sets its thread count (as a volunteer does) and quantizes: it used the pool
    torch.set_num_threads(torch.get_num_threads())
    torch.quantize_per_tensor(torch.randn(5000), 0.1, 10, torch.quint8).int_repr()
    context = multiprocessing.get_context("fork")
    failures = 0
    for _ in range(20):
        child = context.Process(target=_quantize_in_threads_after_fork)
        child.start()
        child.join(timeout=60)
        failures += child.exitcode != 0
    assert failures == 0, f"{failures} of 20 forked processes failed to quantize in 8 threads at once"


def test_the_witness_serves_its_state_after_every_trainer(tmp_path, coordinator_key):
    # seen on CI: two honest peers lost a round that a state forger and the witness averaged; both loaded the forger's
    # θ (it announces the top priority), and no trainer held the θ the witness published. The witness now serves the
    # state it holds to loads that check θ against the published hash, after every trainer.
    from omi.swarm.diloco import GlobalState
    from omi.swarm.witness import RoundWitness
    from swarm_helpers import tiny_model

    with dht_peers(coordinator_key, tmp_path, count=3) as (spec, _, dhts):
        spec.witnessed = True
        witness = RoundWitness(dhts[0], spec, tiny_model())
        params = [p.detach() for p in tiny_model().parameters()]
        forged = GlobalState.initial([p + 1.0 for p in params], spec.rounds)
        forger = make_round_averager(spec, dhts[1], deltas=[torch.zeros_like(p) for p in params], state=forged.serve)
        forger.state_sharing_priority = 1e9
        wanted = GlobalState.initial(params, spec.rounds)
        loader = make_round_averager(spec, dhts[2], deltas=[torch.zeros_like(p) for p in params])
        try:
            assert witness.snapshot().state_hash == wanted.hash() != forged.hash()
            time.sleep(2.0)  # both declared themselves for download in the DHT
            served, peer = loader.download_state(wanted, timeout=30.0, skip=set())
            assert peer == dhts[1].peer_id.to_base58(), "a trainer's state comes before the witness's"
            served, peer = loader.download_state(wanted, timeout=30.0, skip=set(), expect=wanted.hash())
            assert peer == dhts[0].peer_id.to_base58(), peer
            assert all(torch.equal(a, b) for a, b in zip(served.theta, params, strict=True))
            # a load that checks nothing never takes the witness's state (it may be a round behind the trainers')
            assert loader.download_state(wanted, timeout=30.0, skip={dhts[1].peer_id.to_base58()}) is None
        finally:
            for averager in (loader, forger, witness):
                averager.shutdown()
