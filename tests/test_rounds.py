"""DiLoCo rounds on real hivemind peers (omi.swarm.rounds): honest peers hold bitwise the same θ every round."""

from __future__ import annotations

import pytest
from swarm_helpers import make_spec, start_swarm

pytestmark = pytest.mark.slow


def _run(tmp_path, coordinator_key, trainers: list[dict], **spec_kwargs) -> list[dict]:
    spec = make_spec(coordinator_key, matchmaking_time=1.5, averaging_timeout=10.0, **spec_kwargs)
    procs, _ = start_swarm(tmp_path, coordinator_key, spec, trainers)
    try:
        return [p.wait_result(timeout=150) for p in procs[1:]]
    finally:
        for p in procs:
            p.stop()


def _agree(results: list[dict], peers: int) -> int:
    """Assert what honest peers do in every round: those that started it from the same θ and averaged together end
    it with the same θ, and one whose all-reduce failed keeps its θ. Returns in how many rounds all ``peers``
    averaged together from one θ.

    Peers reporting the same round, start θ and group size k > 1 were one group when exactly k of them report it
    (two groups of k from one θ cannot be told apart; with three peers there are none)."""
    groups: dict[tuple[int, str, int], list[str]] = {}  # (round, θ it started from, group size) -> each one's end θ
    for result in results:
        started = {s["round"]: s["start_hash"] for s in result["starts"]}
        for entry in result["rounds"]:
            start = started[entry["round"]]
            if not entry["applied"]:
                assert entry["end_hash"] == start, f"round {entry['round']}: no outer step, yet θ moved: {result}"
            elif entry["group_size"] > 1:
                groups.setdefault((entry["round"], start, entry["group_size"]), []).append(entry["end_hash"])
    together = 0
    for (round_number, _, size), ends in sorted(groups.items()):
        if len(ends) == size:
            assert len(set(ends)) == 1, (f"round {round_number}: peers hold different θ after averaging together: "
                                         f"{[(r['starts'], r['rounds']) for r in results]}")
            together += size == peers
    return together


def _compact(result: dict) -> dict:
    """A trainer's result, short enough for an assertion message: starts (round, θ) and rounds (round, group size,
    applied, end θ), hashes cut to 8 characters."""
    return dict(starts=[(s["round"], s["start_hash"][:8]) for s in result["starts"]],
                rounds=[(e["round"], e["group_size"], e["applied"], e["end_hash"][:8]) for e in result["rounds"]],
                state_loads=result["state_loads"])


def test_honest_peers_hold_bitwise_identical_parameters_after_every_round(tmp_path, coordinator_key):
    # 8-bit pseudo-gradients: with hivemind's own runner every peer would add back its own compression error
    results = _run(tmp_path, coordinator_key, [dict(rounds=5) for _ in range(3)], inner_steps=5,
                   round_compression="uniform8bit")
    # peers wait for each other before round 0 (seen: all three together in 5 of 5 rounds); one round may miss its
    # group on a loaded machine, and the peers then sync from each other at the next round start
    assert _agree(results, 3) >= 4, f"too few rounds averaged by all three from one θ: {results}"
    assert len({result["rounds"][-1]["end_hash"] for result in results}) == 1, "peers end the run apart"
    assert all(e["bytes_sent"] > 0 for result in results for e in result["rounds"] if e["group_size"] > 1)
    # the tiny regression overshoots now and then with DiLoCo's outer Nesterov 0.7 / 0.9 (seen: 3.8, 1.3, 0.4, 3.0):
    # the test asks for progress, not for a monotone loss
    first = min(result["rounds"][0]["loss"] for result in results)
    best = min(entry["loss"] for result in results for entry in result["rounds"][1:])
    assert best < 0.5 * first, f"no progress over the rounds: {[r['rounds'] for r in results]}"


def test_overlapped_rounds_with_centered_clip_and_a_late_joiner(tmp_path, coordinator_key):
    # peer 2 joins while the others are at round 2 or later: it loads θ and the outer momentum from them
    # (intruder: the others do not wait for it to show up before they start). Δ is top-k'd (10 %, error feedback)
    # and sent sparse: CenteredClip of sparse parts stays on their union, still identical on every peer
    trainers = [dict(rounds=9), dict(rounds=9), dict(rounds=9, start_delay=6.0, intruder=True)]
    results = _run(tmp_path, coordinator_key, trainers, inner_steps=5, overlap=True, reducer="centered_clip",
                   round_compression="sparse8bit", topk_density=0.1)
    late = results[2]
    assert late["state_loads"] >= 1, "the late joiner did not load the swarm's state"
    first_round = late["starts"][0]["round"]
    assert first_round >= 1, f"the late joiner started at round {first_round}"
    # it starts from exactly the θ the others started that round from
    starts = {(s["round"], s["start_hash"]) for result in results[:2] for s in result["starts"]}
    assert (first_round, late["starts"][0]["start_hash"]) in starts
    # with overlap the update of round r lands at the end of round r+1: peers still agree bitwise
    assert _agree(results, 3) >= 1, f"no round averaged by all three from one θ: {results}"


def test_a_round_closes_on_time_with_a_slow_volunteer(tmp_path, coordinator_key):
    # by samples a round would take ~13 s (40 inner steps per peer, the slow peer 5x slower than the fast one);
    # with max_round_seconds = 4 it closes after ~4 s, and the slow peer's few steps count too (weighted by samples)
    trainers = [dict(rounds=3, step_sleep=0.2), dict(rounds=3, step_sleep=1.0)]
    results = _run(tmp_path, coordinator_key, trainers, inner_steps=40, max_round_seconds=4.0,
                   round_compression="uniform8bit")
    fast, slow = results
    assert all(entry["inner_steps"] < 40 for entry in fast["rounds"]), fast["rounds"]
    assert all(entry["inner_steps"] >= 1 for entry in slow["rounds"]), slow["rounds"]
    assert _agree(results, 2) >= 1, f"no round averaged by both from one θ: {results}"


def test_the_witness_follows_the_rounds_and_a_late_joiner_refuses_a_forged_state(tmp_path, coordinator_key):
    # issue 12, point 7: hivemind's load_state_from_peers takes the state of the peer announcing the highest
    # priority; a forger announcing the top one handed every late joiner its θ. The joiner now checks θ against the
    # hash the coordinator's witness published for the round, refuses the forger's and loads an honest peer's.
    spec = make_spec(coordinator_key, matchmaking_time=1.5, averaging_timeout=10.0, inner_steps=5)
    spec.witnessed = True
    witness_file = str(tmp_path / "witness" / "result.json")
    # the honest trainers check each round's θ against the witness's hash, as every node does
    trainers = [dict(rounds=10, witness_file=witness_file), dict(rounds=10, forge_state=True),
                dict(rounds=10, start_delay=6.0, intruder=True, witness_file=witness_file)]
    procs, _ = start_swarm(tmp_path, coordinator_key, spec, trainers, witness=True)
    try:
        joiner = procs[3].wait_result(timeout=150)
        first_trainer = procs[1].wait_result(timeout=30)
        said = procs[3].tail(400)
        held = procs[4].wait_result(5)["rounds"]
    finally:
        for p in procs:
            p.stop()
    # points 3 and 7: the coordinator's round and checkpoints come from a weight-0 member of each round's all-reduce
    # that applies the outer step itself; every θ it confirmed from a group of two or more trainers is the one the
    # trainers started that round from. Known limit (docs/verification.md): when the swarm splits in matchmaking and
    # one peer is alone with the witness (here the forger, which trains honestly), the witness confirms that peer's
    # θ while the two others start the next round from their own group's (seen in 2 of about 9 suite runs,
    # 2026-12-07). Confirming only a majority's group was tried and reverted: splits then went unreconciled (no
    # published hash) and the checkpoints test's last rounds unwritten.
    confirmed = {h["round"]: h["state_hash"] for h in held if h["confirmed"] and h["trainers"] >= 2}
    starts = {}
    for result in (first_trainer, joiner):
        for start in result["starts"]:
            starts.setdefault(start["round"], set()).add(start["start_hash"])
    assert len([h for h in held if h["confirmed"] and h["trainers"] >= 2]) >= 4, held
    last = max(starts)  # the θ the witness confirms after the trainers' last round has no start to compare with
    seen = {"held": [(h["round"], h["state_hash"][:8], h["confirmed"], h["trainers"]) for h in held],
            **{name: _compact(result) for name, result in (("first", first_trainer), ("joiner", joiner))}}
    for round_number, state in confirmed.items():
        assert round_number > last or state in starts.get(round_number, set()), (round_number, state[:8], seen)
    assert all(e["group_size"] <= 3 for e in joiner["rounds"]), joiner  # the witness is not counted as a trainer
    # it joined late (loaded, refused the forger's θ, loaded the witnessed one) and trained only from confirmed θs.
    # With rounds of ~1.7 s the honest peer may be a round further by the time the check runs (seen on CI): the
    # joiner then catches up with the swarm's newest state from the peers not refuted and checks that round's θ.
    assert joiner["starts"][0]["round"] > 0 and joiner["state_loads"] >= 2, (joiner, said)
    assert "is not the one the coordinator witnessed" in said, said
    checked = [s for s in joiner["starts"] if s["round"] in confirmed]
    assert checked and all(confirmed[s["round"]] == s["start_hash"] for s in checked), (joiner["starts"], confirmed)
