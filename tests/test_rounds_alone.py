"""A RoundOptimizer with no other trainer (one real hivemind DHT peer in this process): the outer step it takes
alone, and the one it must not take."""

import torch
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
