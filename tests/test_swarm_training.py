"""CenteredClip on tensors and streamed parts; in a real swarm, a peer without a token for its peer id can neither
average with the token holders' rounds nor download their state."""

import asyncio
import time

import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import as_aiter
from hivemind.utils.timed_storage import get_dht_time
from omi import swarm
from omi.protos import signing
from omi.swarm import CenteredClipReducer, centered_clip
from omi.swarm.rounds import RoundAverager, rounds_prefix
from processes import wait_until
from swarm_helpers import make_peer_files, make_spec, start_swarm

# ---------------------------------------------------------------- CenteredClip on tensors


def test_centered_clip_stays_near_the_honest_mean_where_the_mean_does_not():
    torch.manual_seed(0)
    honest = torch.randn(1, 1000) + 0.05 * torch.randn(3, 1000)  # three similar honest gradients
    attacker = -1000 * honest[:1]
    parts, weights = torch.cat([honest, attacker]), torch.ones(4)
    honest_mean = honest.mean(0)
    mean = (parts * weights[:, None]).sum(0) / weights.sum()
    clipped = centered_clip(parts, weights, tau=1.0, iterations=5)
    assert (mean - honest_mean).norm() > 100 * honest_mean.norm()
    assert (clipped - honest_mean).norm() < 0.2 * honest_mean.norm()
    # without outliers (all within tau) CenteredClip is exactly the weighted mean
    near = torch.ones(3, 10) + 0.01 * torch.randn(3, 10)
    w = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(centered_clip(near, w, tau=10.0, iterations=1), (near * w[:, None]).sum(0) / w.sum())
    # zero-weight senders (hivemind peers tagging along) do not count
    assert torch.allclose(centered_clip(parts, torch.tensor([1.0, 1.0, 1.0, 0.0]), tau=100.0, iterations=1),
                          honest_mean, atol=1e-6)


def test_centered_clip_reducer_reduces_parts_streamed_by_senders():
    async def scenario():
        torch.manual_seed(1)
        shapes = (torch.Size([64]), torch.Size([32]))
        honest = [[torch.randn(s) * 0 + 1 + 0.01 * torch.randn(s) for s in shapes] for _ in range(3)]
        senders = honest + [[-1000 * part for part in honest[0]]]
        reducer = CenteredClipReducer(shapes, num_senders=4, tau=1.0, iterations=5)

        async def send(index):
            return [await reducer.accumulate_part(index, part_index, part, weight=1.0)
                    for part_index, part in enumerate(senders[index])]

        results = await asyncio.wait_for(asyncio.gather(*(send(i) for i in range(4))), timeout=10)
        assert reducer.finished.is_set()
        for part_index in range(2):
            honest_mean = torch.stack([h[part_index] for h in honest]).mean(0)
            for sender_result in results:  # every sender gets the same reduced part
                assert torch.equal(sender_result[part_index], results[0][part_index])
            assert (results[0][part_index] - honest_mean).norm() < 0.2 * honest_mean.norm()

    asyncio.run(scenario())


# ---------------------------------------------------------------- swarms of real peers


async def _probe_averaging_rpcs(maddrs: list[str], target: str, prefix: str, p2p: P2P | None = None,
                                join: bool = True) -> dict:
    """Call the round averager's RPCs of peer ``target`` directly (as a fresh libp2p peer unless ``p2p`` given).

    A join request that passes the token check waits on hivemind's matchmaking, so the control skips it.
    """
    own = p2p is None
    if own:
        p2p = await P2P.create(initial_peers=maddrs)
    try:
        peer = PeerID.from_base58(target)
        grad = state = RoundAverager.get_stub(p2p, peer, namespace=prefix)
        join_code = None
        if join:
            stream = await grad.rpc_join_group(averaging_pb2.JoinRequest(
                schema_hash=b"probe", expiration=get_dht_time() + 5, group_key=f"{prefix}.0b"))
            try:
                join_code = (await asyncio.wait_for(stream.__anext__(), 10)).code
            except StopAsyncIteration:
                join_code = "no answer"
        try:
            part = await grad.rpc_aggregate_part(as_aiter(averaging_pb2.AveragingData(
                code=averaging_pb2.PART_FOR_AVERAGING, group_id=b"probe-group")))
            part_code = (await asyncio.wait_for(part.__anext__(), 10)).code
        except (StopAsyncIteration, BrokenPipeError, ConnectionError):
            # the refusal sometimes arrives as a closed stream rather than a PROTOCOL_VIOLATION message
            part_code = "no answer"
        downloaded = 0
        async for _ in await state.rpc_download_state(averaging_pb2.DownloadRequest()):
            downloaded += 1
        return dict(join=join_code, part=part_code, state_messages=downloaded)
    finally:
        if own:
            await p2p.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_peer_without_a_token_for_its_peer_id_cannot_average_nor_download_state(tmp_path):
    coordinator_key = signing.generate_key()
    spec = make_spec(coordinator_key, reducer="mean", matchmaking_time=1.5, averaging_timeout=10.0, inner_steps=5)
    # the intruder holds a real token, but for another peer id: it gets into the DHT (its RSA key matches), so it
    # finds the averaging groups, yet libp2p proves its peer id, for which no token exists
    trainers = [dict(rounds=3), dict(rounds=3),
                dict(rounds=3, intruder=True, token_peer_id="QmNotTheIntrudersPeerId", train_timeout=40)]
    procs, files = start_swarm(tmp_path, coordinator_key, spec, trainers)
    member = None
    try:
        honest_maddrs = procs[1].wait_ready()["maddrs"]
        results = [p.wait_result(150) for p in procs[1:]]

        # direct calls of a token-less libp2p peer, and of a token holder (the control), on honest peer 0
        spec.initial_peers[:] = procs[0].wait_ready()["maddrs"]
        refused = asyncio.run(_probe_averaging_rpcs(honest_maddrs, files[0].peer_id, rounds_prefix(spec)))
        member_files = make_peer_files(tmp_path / "member", coordinator_key, spec)
        member = swarm.start_dht(spec, swarm.TokenFile(member_files.token_path),
                                 swarm_key=swarm.load_or_create_swarm_key(member_files.swarm_key_path),
                                 identity_path=member_files.identity_path)
        registry_key, member_id = swarm.token_registry_key(spec.dht_prefix), member.peer_id.to_base58()
        wait_until(lambda: (found := member.get(registry_key, latest=True)) is not None and member_id in found.value,
                   30, "the member's token in the registry")

        async def as_member():
            return await _probe_averaging_rpcs(honest_maddrs, files[0].peer_id, rounds_prefix(spec),
                                               p2p=await member.replicate_p2p(), join=False)

        # the target reads the token registry through its own DHT view, which may lag the member's by a refresh:
        # the legit member may be refused (0 state messages) for a moment, so it asks again, a bounded few times
        for _ in range(5):
            allowed = asyncio.run(as_member())
            if allowed["state_messages"] > 0:
                break
            time.sleep(2.0)
    finally:
        if member is not None:
            member.shutdown()
        for p in procs:
            p.stop()

    honest, intruder = results[:2], results[2]
    for r in honest:
        exchanged = [entry["exchanged"] for entry in r["rounds"]]
        assert r["rounds_averaged"] >= 1 and set(exchanged) <= {0, 1, 2}, r["rounds"]
    # The honest peers never reduced a part of the intruder (they exchanged parts with at most 2 senders, never 3),
    # and no honest part ever reached the intruder: it reduced only its own. (Its group_size may say 3: that counts
    # the trainers its group gathered at matchmaking, and the honest members then refused the group before any
    # tensor left them.)
    assert intruder["rounds_averaged"] == 0, intruder
    assert {entry["exchanged"] for entry in intruder["rounds"]} <= {0, 1}, intruder

    assert refused["join"] in (averaging_pb2.PROTOCOL_VIOLATION, "no answer"), refused
    assert refused["part"] in (averaging_pb2.PROTOCOL_VIOLATION, "no answer"), refused
    assert refused["state_messages"] == 0, refused
    assert allowed["part"] == averaging_pb2.BAD_GROUP_ID  # let through; there is just no such group
    assert allowed["state_messages"] > 0
