"""A volunteer that loaded θ from a peer checks it against the hash the coordinator's witness publishes for the round
(node.trainer.Trainer._await_witnessed): it asks again while the hash is not published yet, stops asking once the run's
round (the witness's) has reached the loaded round without one, and at once when the node stops. A real coordinator
(gRPC, SQLite) in this process; the witness's publication is what the checkpointer calls (``Runs.advance``)."""

import logging
import threading
import time

import pytest
from coordinator_helpers import ServerThread, run_toml, trainer

pytestmark = pytest.mark.timeout(60)

ROUND = 3
THETA = "ab" * 32  # the witness's hash of round 3's θ


@pytest.fixture
def witnessed(tmp_path):
    """``(server, volunteer)``: a volunteer of a witnessed run at round ``ROUND - 1`` whose matchmaking takes 10 s, so
    that the longest wait (two matchmaking times) is far from one that ends at once."""
    with ServerThread(tmp_path / "state", run_toml()) as server:
        volunteer = trainer(server, tmp_path)
        volunteer.spec.witnessed = True  # the run of a ServerThread has no swarm, hence no witness of its own
        volunteer.spec.averaging.matchmaking_time = 10.0
        server.coordinator.runs.advance("t", ROUND - 1)  # the witness saw the round that served θ begin
        yield server, volunteer


def waited_for_hash(volunteer) -> tuple[str, float]:
    """The hash the volunteer trains round ``ROUND`` against ("" : none) and the seconds it waited for it."""
    started = time.monotonic()
    assignment = volunteer._await_witnessed(ROUND, volunteer._get_work(ROUND))
    return assignment.state_hash, time.monotonic() - started


def test_a_hash_published_while_it_waits_is_the_one_it_checks(witnessed):
    server, volunteer = witnessed
    publish = threading.Timer(1.0, server.coordinator.runs.advance, args=("t", ROUND, THETA))
    publish.start()
    try:
        state_hash, waited = waited_for_hash(volunteer)
    finally:
        publish.cancel()
    assert state_hash == THETA
    assert waited < volunteer.spec.averaging.matchmaking_time, waited  # as soon as published, not at the deadline


def test_it_stops_waiting_once_the_runs_round_reached_the_loaded_one_without_a_hash(witnessed):
    # the witness missed the all-reduce that ended the previous round: it holds this round unconfirmed and publishes
    # no hash for it (seen: a joiner waited out a whole short round for a hash that never came)
    server, volunteer = witnessed
    server.coordinator.runs.advance("t", ROUND)
    state_hash, waited = waited_for_hash(volunteer)
    assert state_hash == ""
    assert waited < volunteer.spec.averaging.matchmaking_time, waited


def test_without_a_hash_while_the_run_is_behind_it_waits_two_matchmaking_times_then_trains_unchecked(witnessed,
                                                                                                     caplog):
    server, volunteer = witnessed
    volunteer.spec.averaging.matchmaking_time = 1.0
    server.coordinator.runs.advance("t", ROUND - 1, "cd" * 32)  # the previous round's hash: not this round's
    with caplog.at_level(logging.WARNING, logger="omi.node.trainer"):
        state_hash, waited = waited_for_hash(volunteer)
    assert state_hash == "" and waited >= 2 * volunteer.spec.averaging.matchmaking_time, waited
    assert f"round {ROUND}: the coordinator published no θ hash" in caplog.text


def test_a_node_asked_to_stop_stops_waiting_and_says_nothing_of_an_unchecked_state(witnessed, caplog):
    server, volunteer = witnessed
    stop = threading.Timer(0.5, volunteer.stop.set)
    stop.start()
    with caplog.at_level(logging.WARNING, logger="omi.node.trainer"):
        state_hash, waited = waited_for_hash(volunteer)
    stop.cancel()
    assert state_hash == "" and waited < volunteer.spec.averaging.matchmaking_time, waited
    assert "published no θ hash" not in caplog.text  # it trains nothing: it leaves
