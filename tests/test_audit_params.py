"""An audited round's training states, served peer to peer (real hivemind DHT peers and libp2p daemons on loopback)."""

import asyncio
import functools

import pytest
import torch
from hivemind.p2p import P2P
from omi.models.segments import RoundStates, training_state, training_state_hash
from omi.protos import pb
from omi.swarm.params_p2p import (
    ParamsFetcher,
    ParamsRefused,
    ParamsServer,
    ParamsUnavailable,
    StreamCut,
    namespace,
)

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(120)
def test_a_node_serves_its_audited_training_states_by_hash_to_token_holders_only(swarm_dht):
    spec, bootstrap, (node_dht, validator_dht) = swarm_dht
    model = torch.nn.Sequential(torch.nn.Linear(300, 1000), torch.nn.Linear(1000, 4))  # ~1.2 MiB of parameters
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    segments = RoundStates(folder=None)  # a round of one inner step: its start and end states, as the trainer keeps
    segments.add(training_state(model, optimizer))
    model(torch.ones(1, 300)).sum().backward()
    optimizer.step()
    end = training_state(model, optimizer)  # parameters and both AdamW moments: ~3.6 MiB, four chunks
    digest = segments.add(end)
    server = ParamsServer.start(node_dht, spec)
    fetcher = ParamsFetcher(validator_dht, spec, timeout=10)
    node = node_dht.peer_id.to_base58()
    try:
        segments.hand_over(server)  # what the trainer's _hold_segments does when its round is audited
        got = fetcher.fetch(node, digest, max_bytes=10 << 20)
        assert got.keys() == end.keys() and all(torch.equal(got[k], end[k]) for k in end)
        assert training_state_hash(got) == digest and server.served == 1

        with pytest.raises(ParamsRefused, match="not held"):
            fetcher.fetch(node, b"x" * 32, max_bytes=10 << 20)
        with pytest.raises(ParamsRefused, match="more than the model"):
            fetcher.fetch(node, digest, max_bytes=1000)
        with pytest.raises(ParamsRefused, match="bad peer id"):
            fetcher.fetch("not-a-peer-id", digest, max_bytes=10 << 20)
        # a peer that serves no states (the coordinator's bootstrap peer): unavailable, not a refusal
        with pytest.raises(ParamsUnavailable):
            fetcher.fetch(bootstrap.peer_id.to_base58(), digest, max_bytes=10 << 20)

        # only `keep` states are held, oldest dropped first
        for i in range(server.keep + 1):
            server.hold(bytes([i]) * 32, end)
        assert digest not in server.held() and len(server.held()) == server.keep

        # a stock libp2p peer without a token of the run gets an error, not the parameters. It dials the node itself:
        # through the bootstrap peer alone its libp2p routing table may still be empty when it opens the stream
        # ("failed to find any peer in table", seen once in a fresh-clone run)
        node_maddrs = [str(m) for m in node_dht.get_visible_maddrs()]

        async def intruder():
            p2p = await P2P.create(initial_peers=node_maddrs)
            try:
                stub = ParamsServer.get_stub(p2p, node_dht.peer_id, namespace=namespace(spec))
                stream = await stub.rpc_get_params(pb.ParamsRequest(params_hash=bytes([1]) * 32))
                return [chunk async for chunk in stream]
            finally:
                await p2p.shutdown()

        chunks = asyncio.run(intruder())
        assert [c.error for c in chunks] == ["no valid access token for this run"] and not chunks[0].data
    finally:
        fetcher.shutdown()
        server.shutdown()


def cut_streams(monkeypatch, cuts: list[int]) -> None:
    """The node's next ``cuts[0]`` streams close after their first chunk without an error (as a libp2p stream closed
    mid-transfer does). hivemind names a handler by its servicer's class: the method is replaced, not subclassed."""
    serve = ParamsServer.rpc_get_params

    @functools.wraps(serve)
    async def cutting(self, request, context):
        cut = cuts[0] > 0
        cuts[0] -= cut
        async for chunk in serve(self, request, context):
            yield chunk
            if cut:
                return

    monkeypatch.setattr(ParamsServer, "rpc_get_params", cutting)


@pytest.mark.timeout(120)
def test_a_stream_cut_short_is_asked_for_once_more(swarm_dht, monkeypatch):
    spec, _bootstrap, (node_dht, validator_dht) = swarm_dht
    state = {"weight": torch.randn(1 << 19)}  # 2 MiB: two chunks
    digest = b"d" * 32
    cuts = [0]
    cut_streams(monkeypatch, cuts)
    server = ParamsServer.start(node_dht, spec)
    fetcher = ParamsFetcher(validator_dht, spec, timeout=10)
    node = node_dht.peer_id.to_base58()
    try:
        server.hold(digest, state)
        cuts[0] = 1  # cut once: the second stream delivers
        assert torch.equal(fetcher.fetch(node, digest, max_bytes=10 << 20)["weight"], state["weight"])
        assert server.served == 2
        cuts[0] = 2  # cut twice: no parameters, unavailable (nothing known about the node's honesty)
        with pytest.raises(StreamCut, match="stream ended after 1048576 of"):
            fetcher.fetch(node, digest, max_bytes=10 << 20)
        assert server.served == 4
    finally:
        fetcher.shutdown()
        server.shutdown()
