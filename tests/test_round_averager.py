"""The round averager (two real hivemind averagers in processes of this one): a step cancelled while it looks for a
group leaves the averager able to average again."""

import asyncio
import gc
import time

import torch
from hivemind.averaging.control import AveragingStage
from hivemind.averaging.key_manager import GroupKeyManager
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
