"""The coordinator over real gRPC on 127.0.0.1 with a real SQLite file and a real PostgreSQL database: registration,
runs, work, ledger, audits."""

import json
import time

import grpc
import pytest
from coordinator_helpers import FakeClock, ServerThread, TcpRelay, contribution_for, run_toml
from omi.coordinator.registry import RegistryConfig
from omi.node.client import CoordinatorClient, register_request
from omi.protos import pb, rpc, signing
from omi.protos.channels import CertificateRefused, parse_target
from omi.protos.peer_ids import new_identity, peer_id_of_identity
from omi.protos.signing import generate_key
from sqlalchemy import text

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server(tmp_path, db_url):
    with ServerThread(tmp_path / "state", run_toml(), db_url=db_url) as s:
        yield s


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def refused(server, call, code: grpc.StatusCode, match: str = "") -> None:
    """``call`` fails with ``code`` (details containing ``match``) and no table changes.

    Heartbeats reach their table in the coordinator's periodic flush: flushed before and after the call, a beat an
    earlier call held in memory is not counted as this call's, and one this call made is."""
    server.coordinator.liveness.flush()
    before = server.store.row_counts()
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details()
    server.coordinator.liveness.flush()
    assert server.store.row_counts() == before


# ---------------------------------------------------------------- registration and tokens


def expected_shards(work) -> int:
    """4 shards of 64 (a new identity's round share of 256); one more when the short last shard (5 samples) is among
    them."""
    return 5 if any(r.end - r.start < 64 for r in work.shards) else 4

def test_register_gives_signed_token_and_runspec(server):
    key = generate_key()
    client = CoordinatorClient(server.address, key, attempts=1)
    identity = new_identity()
    reply = client.register("t", identity, display_name="alice", swarm_public_key=b"swarm")
    assert reply.node_id == signing.node_id(signing.public_bytes(key)) == client.node_id
    spec = reply.run_spec
    assert spec.run_id == "t" and spec.coordinator_public_key == server.coordinator.public_key
    assert signing.verify(reply.token, spec.coordinator_public_key)
    token = reply.token
    assert (token.node_id, token.peer_id, token.run_id, token.swarm_public_key) == (
        client.node_id, peer_id_of_identity(identity), "t", b"swarm")
    assert token.node_public_key == signing.public_bytes(key)
    assert abs(token.expires_at_ms - token.issued_at_ms - spec.liveness.token_ttl * 1000) < 1
    counts = server.store.row_counts()
    assert counts["nodes"] == 1 and counts["tokens"] == 1

    renewed = client.renew_token()
    assert signing.verify(renewed, spec.coordinator_public_key) and renewed.expires_at_ms >= token.expires_at_ms
    assert server.store.row_counts()["tokens"] == 2
    assert client.heartbeat(round_number=0).run_state == pb.RUN_STATE_RUNNING


def test_reused_nonce_and_expired_challenge_are_refused(tmp_path, db_url):
    clock = FakeClock()
    with ServerThread(tmp_path / "state", run_toml(), clock=clock, db_url=db_url) as server:
        key = generate_key()
        challenge = server.stub.GetChallenge(pb.GetChallengeRequest())
        assert challenge.expires_at_ms > clock()

        identity = new_identity()

        def register(nonce):
            return server.stub.Register(register_request(key, nonce, "t", identity))

        assert register(challenge.nonce).node_id
        server.coordinator.liveness.flush()  # the registration's heartbeat row: a periodic flush adds none meanwhile
        refused(server, lambda: register(challenge.nonce), grpc.StatusCode.UNAUTHENTICATED, "already used")
        refused(server, lambda: register(b"\x00" * 32), grpc.StatusCode.UNAUTHENTICATED)
        late = server.stub.GetChallenge(pb.GetChallengeRequest())
        clock.advance(RegistryConfig().challenge_ttl + 0.1)  # the production TTL, skipped instead of waited for
        refused(server, lambda: register(late.nonce), grpc.StatusCode.UNAUTHENTICATED, "expired")


def test_a_peer_id_is_proven_with_its_libp2p_key_and_bound_to_one_identity(server):
    """Issue 12, point 5: peer ids were taken on the node's word (two identities registered with one peer id; a
    banned node came back under a new key with its old libp2p identity and kept passing the averaging gate)."""
    def attempt(key, identity, *, run_id="t", tamper=None):
        nonce = server.stub.GetChallenge(pb.GetChallengeRequest()).nonce
        request = register_request(key, nonce, run_id, identity)
        if tamper is not None:
            tamper(request)
            signing.sign(request, key)  # the node's own signature is fine; the peer proof is what is wrong
        return server.stub.Register(request)

    alice, mallory = generate_key(), generate_key()
    alice_peer = new_identity()
    no_proof = lambda r: (r.ClearField("peer_public_key"), r.ClearField("peer_signature"))  # noqa: E731
    refused(server, lambda: attempt(mallory, new_identity(), tamper=no_proof), grpc.StatusCode.UNAUTHENTICATED,
            "no proof of the libp2p key")
    # naming alice's peer id while proving another key
    claim = lambda r: setattr(r, "peer_id", peer_id_of_identity(alice_peer))  # noqa: E731
    refused(server, lambda: attempt(mallory, new_identity(), tamper=claim), grpc.StatusCode.UNAUTHENTICATED,
            "is not the peer id of peer_public_key")
    # a proof made for another challenge (a replayed registration's) does not verify with this one
    old = register_request(mallory, b"\x01" * 32, "t", alice_peer)
    replay = lambda r: (r.__setattr__("peer_signature", old.peer_signature),  # noqa: E731
                        r.__setattr__("peer_public_key", old.peer_public_key), claim(r))
    refused(server, lambda: attempt(mallory, new_identity(), tamper=replay), grpc.StatusCode.UNAUTHENTICATED,
            "does not sign this challenge")

    assert attempt(alice, alice_peer).token.peer_id == peer_id_of_identity(alice_peer)
    assert attempt(alice, alice_peer).node_id  # the same node again: its own peer id
    # a second identity holding the same libp2p key (it proves the key, but the peer id is alice's)
    refused(server, lambda: attempt(mallory, alice_peer), grpc.StatusCode.PERMISSION_DENIED,
            "one peer id, one identity")

    # a banned node under a new Ed25519 key keeps no foothold through its libp2p identity
    cheater_peer = new_identity()
    cheater = CoordinatorClient(server.address, generate_key(), attempts=1)
    cheater.register("t", cheater_peer)
    server.coordinator.registry.ban(cheater.node_id, "test")
    refused(server, lambda: attempt(generate_key(), cheater_peer), grpc.StatusCode.PERMISSION_DENIED,
            "a banned node")
    assert server.coordinator.registry.peers_of([cheater.node_id]) == {
        cheater.node_id: [peer_id_of_identity(cheater_peer)]}


def test_wrong_signatures_and_forged_tokens_are_refused(server):
    key, other = generate_key(), generate_key()
    nonce = server.stub.GetChallenge(pb.GetChallengeRequest()).nonce
    request = register_request(key, nonce, "t", new_identity())
    refused(server, lambda: server.stub.Register(signing.sign(request, other)), grpc.StatusCode.UNAUTHENTICATED,
            "signature")

    client = server.node()
    # the request signed by another key than the token's
    request = signing.sign_request(pb.HeartbeatRequest(token=client.token, timestamp_ms=int(time.time() * 1000)),
                                   other)
    refused(server, lambda: server.stub.Heartbeat(request), grpc.StatusCode.UNAUTHENTICATED, "signature")
    # a token whose content was changed (its coordinator signature no longer matches)
    forged = pb.AccessToken()
    forged.CopyFrom(client.token)
    forged.expires_at_ms += 10**9
    client.token = forged
    refused(server, lambda: client.heartbeat(), grpc.StatusCode.UNAUTHENTICATED, "not signed by this coordinator")
    # a token signed by someone else, for a key the attacker holds
    forged = pb.AccessToken(node_id=signing.node_id(signing.public_bytes(other)), run_id="t", peer_id="p",
                            expires_at_ms=int(time.time() * 1000) + 10**6, node_public_key=signing.public_bytes(other))
    attacker = CoordinatorClient(server.address, other, attempts=1)
    attacker.token = signing.sign(forged, other)
    refused(server, lambda: attacker.get_work(0), grpc.StatusCode.UNAUTHENTICATED, "not signed by this coordinator")
    # no token at all
    refused(server, lambda: server.stub.Heartbeat(pb.HeartbeatRequest()), grpc.StatusCode.UNAUTHENTICATED)


def test_stale_timestamp_is_refused(server):
    client = server.node()
    stale = int(time.time() * 1000) - 120_000
    request = signing.sign_request(pb.HeartbeatRequest(token=client.token, timestamp_ms=stale), client.key)
    refused(server, lambda: server.stub.Heartbeat(request), grpc.StatusCode.UNAUTHENTICATED, "stale timestamp")


def test_a_signed_request_is_accepted_once_and_only_by_its_own_rpc(server):
    # issue 12 point 10: the bytes of a signed RenewTokenRequest were accepted by Leave, twice, releasing the
    # victim's assignment
    victim = server.node()
    work = victim.get_work(0)
    renewal = victim._signed(pb.RenewTokenRequest)
    as_leave = pb.LeaveRequest.FromString(renewal.SerializeToString())
    refused(server, lambda: server.stub.Leave(as_leave), grpc.StatusCode.UNAUTHENTICATED, "signature")
    # an old-style request (signed over its bytes alone, no nonce) is refused too
    unbound = signing.sign(pb.LeaveRequest(token=victim.token, timestamp_ms=int(time.time() * 1000)), victim.key)
    refused(server, lambda: server.stub.Leave(unbound), grpc.StatusCode.UNAUTHENTICATED, "signature")
    # the renewal itself is accepted once; its replay is refused
    assert server.stub.RenewToken(renewal).node_id == victim.node_id
    refused(server, lambda: server.stub.RenewToken(renewal), grpc.StatusCode.UNAUTHENTICATED, "replayed")
    heartbeat = victim._signed(pb.HeartbeatRequest, round=0)
    server.stub.Heartbeat(heartbeat)
    refused(server, lambda: server.stub.Heartbeat(heartbeat), grpc.StatusCode.UNAUTHENTICATED, "replayed")
    # the victim's assignment was never released by any of it: it still reports its work
    assert victim.report_contribution(contribution_for(work)).accepted


def test_expired_token_is_refused_until_renewed(tmp_path, db_url):
    clock = FakeClock()
    with ServerThread(tmp_path / "state", run_toml(token_ttl=30.0), clock=clock, db_url=db_url) as server:
        client = server.node()
        client.heartbeat()
        server.coordinator.liveness.flush()  # the node's heartbeat row: a periodic flush adds none meanwhile
        # a TTL the coordinator's clock can skip: its requests' timestamps stay within the 60 s of allowed skew
        clock.advance(30.1)
        refused(server, lambda: client.heartbeat(), grpc.StatusCode.UNAUTHENTICATED, "expired")
        refused(server, lambda: client.get_work(0), grpc.StatusCode.UNAUTHENTICATED, "expired")
        client.renew_token()
        assert client.heartbeat().token_expires_at_ms > clock()


def test_renewals_do_not_grow_the_token_table(tmp_path, db_url):
    clock = FakeClock()
    with ServerThread(tmp_path / "state", run_toml(token_ttl=5.0), clock=clock, db_url=db_url) as server:
        client = server.node()
        for _ in range(6):  # 30.6 s skipped in all: within the 60 s a request's timestamp may be off
            clock.advance(5.1)  # the token expired: renew it, as a node whose token lapsed does
            client.renew_token()
            client.heartbeat()
        assert server.store.row_counts()["tokens"] == 1  # the live token; each renewal removed the expired one


def test_banned_node_cannot_renew_register_or_work(server):
    key = generate_key()
    client = server.node(key=key)
    assert server.admin_call("BanNode", pb.BanNodeRequest(node_id=client.node_id, reason="test")).changed
    assert not server.admin_call("BanNode", pb.BanNodeRequest(node_id=client.node_id)).changed
    refused(server, client.renew_token, grpc.StatusCode.PERMISSION_DENIED, "banned")
    refused(server, lambda: client.get_work(0), grpc.StatusCode.PERMISSION_DENIED, "banned")
    assert code_of(lambda: server.node(key=key)) == grpc.StatusCode.PERMISSION_DENIED
    assert server.admin_call("UnbanNode", pb.BanNodeRequest(node_id=client.node_id)).changed
    client.renew_token()
    assert client.get_work(0).shards


# ---------------------------------------------------------------- runs and admin

def test_runspec_errors_name_the_key_over_grpc(server):
    bad = run_toml("u") + "[averaging]\nreducer = 'median'\n"
    refused(server, lambda: server.admin_call("CreateRun", pb.CreateRunRequest(spec_toml=bad)),
            grpc.StatusCode.INVALID_ARGUMENT, "averaging.reducer")
    bad = run_toml("u").replace("[training]", "[training]\nlr = 0.1")
    refused(server, lambda: server.admin_call("CreateRun", pb.CreateRunRequest(spec_toml=bad)),
            grpc.StatusCode.INVALID_ARGUMENT, "training.lr")


def test_run_lifecycle(server):
    created = server.admin_call("CreateRun", pb.CreateRunRequest(spec_toml=run_toml("life")))
    assert created.state == pb.RUN_STATE_CREATED
    refused(server, lambda: server.admin_call("CreateRun", pb.CreateRunRequest(spec_toml=run_toml("life"))),
            grpc.StatusCode.ALREADY_EXISTS)
    req = pb.RunRequest(run_id="life")
    refused(server, lambda: server.admin_call("PauseRun", req), grpc.StatusCode.FAILED_PRECONDITION, "created")
    assert server.admin_call("ResumeRun", req).state == pb.RUN_STATE_RUNNING
    assert server.admin_call("PauseRun", req).state == pb.RUN_STATE_PAUSED
    client = server.node("life")
    refused(server, lambda: client.get_work(0), grpc.StatusCode.FAILED_PRECONDITION, "not running")
    assert client.heartbeat().run_state == pb.RUN_STATE_PAUSED
    assert server.admin_call("ResumeRun", req).state == pb.RUN_STATE_RUNNING
    assert client.get_work(0).shards
    assert server.admin_call("StopRun", req).state == pb.RUN_STATE_STOPPED
    for method in ("ResumeRun", "PauseRun", "StopRun"):
        refused(server, lambda m=method: server.admin_call(m, req), grpc.StatusCode.FAILED_PRECONDITION, "stopped")
    refused(server, client.renew_token, grpc.StatusCode.FAILED_PRECONDITION, "stopped")
    refused(server, lambda: server.admin_call("PauseRun", pb.RunRequest(run_id="nope")), grpc.StatusCode.NOT_FOUND)
    states = {r.run_id: r.state for r in client.list_runs()}
    assert states == {"t": pb.RUN_STATE_RUNNING, "life": pb.RUN_STATE_STOPPED}


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", "token"),)])
def test_admin_rpcs_need_the_admin_token(server, metadata):
    calls = {"CreateRun": pb.CreateRunRequest(spec_toml=run_toml("x"), start=True),
             "PauseRun": pb.RunRequest(run_id="t"), "ResumeRun": pb.RunRequest(run_id="t"),
             "StopRun": pb.RunRequest(run_id="t"), "BanNode": pb.BanNodeRequest(node_id="a" * 64),
             "UnbanNode": pb.BanNodeRequest(node_id="a" * 64)}
    for method, request in calls.items():
        refused(server, lambda m=method, r=request: getattr(server.admin, m)(r, metadata=metadata),
                grpc.StatusCode.UNAUTHENTICATED)
    assert server.coordinator.runs.get("t").state == pb.RUN_STATE_RUNNING


# ---------------------------------------------------------------- work assignment

def test_work_is_deterministic_and_idempotent(tmp_path):
    key = generate_key()
    assignments = []
    for i in range(2):  # two coordinators with fresh state, same run and node: same shards and seed
        with ServerThread(tmp_path / f"state{i}", run_toml()) as server:
            client = server.node(key=key)
            first = client.get_work(0)
            again = client.get_work(0)
            assert again == first and server.store.row_counts()["work_assignments"] == 1
            assert signing.verify(first, server.coordinator.public_key)
            assignments.append(first)
    a, b = assignments
    assert [s.shard_id for s in a.shards] == [s.shard_id for s in b.shards]
    assert len(a.shards) == expected_shards(a)
    assert a.seed == b.seed and a.micro_batch_size == 32 and a.node_id == signing.node_id(signing.public_bytes(key))
    for shard in a.shards:
        assert (shard.start, shard.end) == (shard.shard_id * 64, min(1797, shard.shard_id * 64 + 64))


def test_no_shard_is_assigned_twice_in_a_round(server):
    nodes = [server.node(name=f"n{i}") for i in range(8)]
    works = [n.get_work(0) for n in nodes]
    shards = [s.shard_id for w in works for s in w.shards]
    assert len(shards) == len(set(shards)) == 29  # all 29 shards (28 of 64 samples, the last of 5), none twice
    # each assignment holds a whole swarm step (target_batch_size 256) while the data lasts: the node holding
    # the short last shard gets one more shard, so the last node gets what is left
    sizes = sorted((sum(r.end - r.start for r in w.shards) for w in works), reverse=True)
    assert all(size >= 256 for size in sizes[:6])
    assert sum(sizes) == 1797 and min(sizes) < 256
    assert len({w.seed for w in works}) == 8
    latecomer = server.node(name="late")
    empty = latecomer.get_work(0)
    assert not empty.shards and not empty.assignment_id
    next_round = nodes[0].get_work(1)
    assert len(next_round.shards) == expected_shards(next_round)  # the next round has its own pool
    with pytest.raises(grpc.RpcError) as info:
        nodes[0].get_work(5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "ahead" in info.value.details()  # retry later


def test_no_node_moves_the_runs_round_only_the_coordinators_witness_does(server):
    # issue 12, point 3: 20 heartbeats naming round 4e9 moved the run from 0 to 20 in 0.02 s, each move handing out
    # a fresh assignment and closing audit windows early; the run's round is now what the coordinator's own witness
    # of the rounds observed (omi.swarm.witness, in the checkpointer process: Runs.advance), never a node's claim
    liar = server.node(name="liar")
    for _ in range(20):
        liar.heartbeat(round_number=2**31 - 1)
    assert code_of(lambda: liar.heartbeat(round_number=4_000_000_000)) == grpc.StatusCode.INVALID_ARGUMENT  # > INTEGER
    work = liar.get_work(2)  # work for a round the witness may not have written yet (MAX_AHEAD)
    assert liar.report_contribution(contribution_for(work)).accepted
    assert liar.get_run_status().summary.round == 0
    assert code_of(lambda: liar.get_work(3)) == grpc.StatusCode.UNAVAILABLE  # no hoarding of future rounds
    server.coordinator.runs.advance("t", 7, "ab" * 32)  # the witness saw round 7 start from θ with this hash
    server.coordinator.runs.advance("t", 5)  # a late, older observation never moves it back
    assert liar.get_run_status().summary.round == 7
    runs = server.coordinator.runs
    assert runs.round_state("t", 7) == "ab" * 32 and runs.round_state("t", 5) is None


def test_rounds_share_a_small_data_set_among_the_volunteers_online(tmp_path, db_url):
    # a round's assignment is 2 × H micro-batches (1,280 samples) so a fast node keeps busy; digits has 1,797:
    # the first of two volunteers online would take most of it and leave the second 517 (16 of its 20 steps)
    with ServerThread(tmp_path / "state", run_toml(inner_steps=20), db_url=db_url) as server:
        alone = server.node(name="alone")
        alone.heartbeat()
        # a new identity is on probation: its own share of a round (H micro-batches), no slack
        probation = alone.get_work(0)
        assert 640 <= sum(r.end - r.start for r in probation.shards) < 640 + 64
        assert alone.report_contribution(contribution_for(probation, alone.run_spec)).accepted
        with server.store.transaction() as s:  # as the auditor marks it once its audit window closed
            s.execute(text("UPDATE contributions SET status = 'verified'"))
        assert sum(r.end - r.start for r in alone.get_work(1).shards) >= 1280  # alone and trusted: the full 2 × H
        first, second = server.node(name="a"), server.node(name="b")
        for node in (first, second):
            node.heartbeat()
        sizes = [sum(r.end - r.start for r in node.get_work(2).shards) for node in (alone, first, second)]
    # three online: an equal share of the data each (599 rounded up to whole shards), every one of them some work
    assert all(512 <= size <= 599 + 64 for size in sizes), sizes


def test_identities_made_by_the_dozen_behind_one_address_leave_a_rounds_data_to_others(tmp_path, db_url):
    """Issue 12, point 6: ten fresh identities took all 29 shards of a round; the honest node got none. One address
    now holds at most 8 assignments per round; the honest node, elsewhere, still gets its share."""
    with ServerThread(tmp_path / "state", run_toml(shards=1, inner_steps=20),
                      db_url=db_url) as server:
        relay = TcpRelay(server.address, source="127.0.0.2")
        try:
            sybils = [server.node(name=f"sybil{i}") for i in range(10)]
            honest = server.node(name="honest", via=relay.address)
            for node in (*sybils, honest):
                node.heartbeat()
            works = [node.get_work(0) for node in sybils]
            held = [sum(r.end - r.start for r in w.shards) for w in works]
            assert sum(1 for size in held if size) == 8 and sum(held) < 1797, held
            mine = honest.get_work(0)
            # an equal share of the data among the 11 online (1797 / 11 = 163, in whole shards of 64)
            assert sum(r.end - r.start for r in mine.shards) >= 163, mine
            assert server.store.row_counts()["assignment_sources"] == 9
            # the cap is per round: the next round's data is open to them again
            assert sum(1 for node in sybils if node.get_work(1).shards) == 8
        finally:
            relay.close()


def test_shards_of_a_node_that_missed_heartbeats_go_back_to_the_pool(tmp_path, db_url):
    clock = FakeClock()
    with ServerThread(tmp_path / "state", run_toml(shards=15, heartbeat_timeout=3.0), db_url=db_url,
                      clock=clock) as server:
        silent, alive, newcomer = (server.node(name=n) for n in ("silent", "alive", "new"))
        for node in (silent, alive, newcomer):  # registering three (keys, TLS) can take longer than the timeout
            node.heartbeat()
        silent_work = silent.get_work(0)
        alive_work = alive.get_work(0)
        assert len(silent_work.shards) == 15 and len(alive_work.shards) == 14
        assert not newcomer.get_work(0).shards
        for _ in range(2):  # 4 s without a beat of the silent one: past its timeout; the others beat every 2 s
            clock.advance(2.0)
            alive.heartbeat()
            newcomer.heartbeat()
        taken_over = newcomer.get_work(0)
        assert sorted(s.shard_id for s in taken_over.shards) == sorted(s.shard_id for s in silent_work.shards)
        assert alive.get_work(0) == alive_work
        server.coordinator.liveness.flush()  # every node's heartbeat row exists: a periodic flush adds none meanwhile
        refused(server, lambda: silent.report_contribution(contribution_for(silent_work)),
                grpc.StatusCode.FAILED_PRECONDITION, "released")
        assert not silent.get_work(0).shards  # back, but every shard is taken now
        assert server.coordinator.run_status("t").summary.volunteers_online == 2


def test_leave_puts_unfinished_shards_back(server):
    leaver, other = server.node(name="a"), server.node(name="b")
    work = leaver.get_work(0)
    for _ in range(7):  # 4 + 6 x 4 + 1: every one of the 29 shards is taken
        server.node(name="filler").get_work(0)
    assert len(work.shards) == expected_shards(work) and not other.get_work(0).shards
    leaver.leave()
    back = other.get_work(0)
    # the leaver's shards are free again: the other node's step's worth comes from them (4 of 64 samples, or 5 with
    # the short last shard: which ones it takes first is random; seen: all 5 of the leaver's but the short one)
    assert {s.shard_id for s in back.shards} <= {s.shard_id for s in work.shards}
    assert len(back.shards) == expected_shards(back)


# ---------------------------------------------------------------- ledger and audits

def test_contribution_recorded_once_and_replay_refused(server):
    client = server.node()
    work = client.get_work(0)
    contribution = contribution_for(work)
    reply = client.report_contribution(contribution)
    assert reply.accepted and reply.contribution_id
    request = client._signed(pb.ReportContributionRequest, contribution=contribution)
    refused(server, lambda: server.stub.ReportContribution(request), grpc.StatusCode.ALREADY_EXISTS)
    second = contribution_for(work, samples=10, mean_loss=0.1)
    refused(server, lambda: client.report_contribution(second), grpc.StatusCode.ALREADY_EXISTS)
    status = client.get_run_status()
    assert status.contributions == 1 and status.summary.total_samples == contribution.samples


def test_non_finite_or_out_of_range_heartbeats_are_refused(server):
    # a NaN loss used to be stored as NULL in a NOT NULL column: every later heartbeat flush failed, for every node
    client, other = server.node(name="bad"), server.node(name="good")
    for fields, name in [(dict(loss=float("nan")), "loss"), (dict(loss=1e300), "loss"),
                         (dict(samples_per_second=-1e300), "samples_per_second"),
                         (dict(samples_per_second=float("inf")), "samples_per_second")]:
        refused(server, lambda fields=fields: client.heartbeat(**fields), grpc.StatusCode.INVALID_ARGUMENT, name)
    other.heartbeat(loss=0.5, samples_per_second=40.0)
    server.coordinator.liveness.flush()  # persisting the beats works: no refused value was held
    from omi.coordinator.store import Heartbeat
    from sqlalchemy import select

    with server.store.session() as s:
        stored = {node_id: loss for node_id, loss in s.execute(select(Heartbeat.node_id, Heartbeat.loss))}
    assert stored.get(other.node_id) == 0.5 and all(0.0 <= loss <= 1e6 for loss in stored.values()), stored


def test_display_names_lose_control_and_bidi_characters(server):
    # a newline and a right-to-left override in a name used to reach the coordinator's log as a forged line
    node = server.node(name="mallory\n2026-11-30 INFO node 1f2e3d banned\u202egnp.exe\u200b")
    from omi.coordinator.store import Node

    with server.store.session() as s:
        stored = s.get(Node, node.node_id).display_name
    assert stored == "mallory 2026-11-30 INFO node 1f2e3d banned gnp.exe"


def test_bad_contributions_are_refused_and_change_nothing(server):
    client, other = server.node(name="a"), server.node(name="b")
    work, other_work = client.get_work(0), other.get_work(0)
    cases = [
        (contribution_for(work, assignment_id="nope"), grpc.StatusCode.NOT_FOUND),
        (contribution_for(other_work), grpc.StatusCode.INVALID_ARGUMENT),
        (contribution_for(work, samples=10**6), grpc.StatusCode.INVALID_ARGUMENT),
        (contribution_for(work, micro_batches=0), grpc.StatusCode.INVALID_ARGUMENT),
        (contribution_for(work, mean_loss=float("nan")), grpc.StatusCode.INVALID_ARGUMENT),
        (contribution_for(work, node_id=other.node_id), grpc.StatusCode.PERMISSION_DENIED),
    ]
    for contribution, code in cases:
        refused(server, lambda c=contribution: client.report_contribution(c), code)
    unsigned_by_node = contribution_for(work, run_id="t", node_id=client.node_id)
    signing.sign(unsigned_by_node, other.key)
    request = client._signed(pb.ReportContributionRequest, contribution=unsigned_by_node)
    refused(server, lambda: server.stub.ReportContribution(request), grpc.StatusCode.INVALID_ARGUMENT, "signature")
    assert client.report_contribution(contribution_for(work)).accepted


# audits, credit and bans: tests/test_verification.py (audits need the records handed over first)


# ---------------------------------------------------------------- status, bad input, limits

def test_run_status_and_views(server):
    a, b = server.node(name="a"), server.node(name="b")
    a.heartbeat(round_number=0, samples_per_second=100.0, loss=0.5)
    b.heartbeat(round_number=1, samples_per_second=50.0, loss=0.3)
    status = a.get_run_status()
    # throughput is the ledger's growth over the last minute; what the nodes say of their speed does not count
    assert status.summary.volunteers_online == 2 and status.samples_per_second == 0.0
    contribution = contribution_for(a.get_work(round_number=0))
    assert a.report_contribution(contribution).accepted
    status = a.get_run_status()
    assert status.samples_per_second == pytest.approx(contribution.samples / 60)
    assert abs(status.last_loss - 0.4) < 1e-9 and status.summary.round == 0  # b's round 1 is only its word
    assert a.list_checkpoints() == []
    assert a.get_run_spec().coordinator_public_key == server.coordinator.public_key
    assert code_of(lambda: a.get_run_status("nope")) == grpc.StatusCode.NOT_FOUND
    server.coordinator.record_metrics()
    assert server.store.row_counts()["run_metrics"] == 1


def test_malformed_and_oversized_messages(tmp_path):
    with ServerThread(tmp_path / "state", run_toml(), max_message_bytes=64 * 1024) as server:
        client = server.node()
        raw = server.channel.unary_unary("/omi.v1.Coordinator/Register")
        refused(server, lambda: raw(b"\xff\xff\xff\xff\xff"), grpc.StatusCode.INVALID_ARGUMENT, "malformed")
        raw_heartbeat = server.channel.unary_unary("/omi.v1.Coordinator/Heartbeat")
        refused(server, lambda: raw_heartbeat(b"\x0a\x05ab"), grpc.StatusCode.INVALID_ARGUMENT, "malformed")
        big = contribution_for(client.get_work(0), gradient_sketch=[0.5] * 20_000)  # ~80 KB
        refused(server, lambda: client.report_contribution(big), grpc.StatusCode.RESOURCE_EXHAUSTED)
        too_long = contribution_for(client.get_work(0), gradient_sketch=[0.5] * 2000)  # longer than sketch_size
        refused(server, lambda: client.report_contribution(too_long), grpc.StatusCode.INVALID_ARGUMENT, "sketch")
        # a signed contribution padded with a field the schema does not name was stored as it came (3 MB seen)
        padded = pb.ReportContributionRequest(contribution=contribution_for(client.get_work(0))).SerializeToString()
        padded += b"\xba\x3e" + bytes([0x80, 0x80, 0x01]) + bytes(16384)  # field 999, 16 KiB of padding
        raw_report = server.channel.unary_unary("/omi.v1.Coordinator/ReportContribution")
        refused(server, lambda: raw_report(padded), grpc.StatusCode.INVALID_ARGUMENT, "does not know")
        assert client.report_contribution(contribution_for(client.get_work(0))).accepted  # still serving


def test_rate_limits(tmp_path):
    limits = RegistryConfig(node_rate=0.5, node_burst=3, register_rate=0.5, register_burst=4)
    with ServerThread(tmp_path / "state", run_toml(), registry=limits) as server:
        client = server.node()  # challenge + register: 2 of the source's 4
        for _ in range(3):
            client.heartbeat()
        refused(server, lambda: client.heartbeat(), grpc.StatusCode.RESOURCE_EXHAUSTED, "too many")
        refused(server, lambda: client.get_work(0), grpc.StatusCode.RESOURCE_EXHAUSTED)
        server.node()
        refused(server, lambda: server.node(), grpc.StatusCode.RESOURCE_EXHAUSTED, "registration")


def test_two_coordinator_processes_share_one_postgresql_database(tmp_path, postgres_server):
    # the store's design (docs: PostgreSQL for more than one coordinator process): tokens, work, the ledger's sample
    # count and bans hold across two coordinators with one state dir (one key) on one database
    url = postgres_server.new_database()
    with ServerThread(tmp_path / "state", run_toml(), db_url=url) as a, \
            ServerThread(tmp_path / "state", None, db_url=url) as b:
        alice, bob = a.node(name="alice"), b.node(name="bob")
        alice_at_b = CoordinatorClient(b.address, alice.key, attempts=1)
        alice_at_b.token = alice.token
        work_a, work_b = alice_at_b.get_work(0), bob.get_work(0)  # alice asks b: her token holds there
        taken = [(s.shard_id, s.start) for w in (work_a, work_b) for s in w.shards]
        assert len(taken) == len(set(taken)), "two coordinators handed out one shard twice"
        assert alice.report_contribution(contribution_for(work_a)).accepted  # reported to a
        assert bob.report_contribution(contribution_for(work_b)).accepted  # reported to b
        samples = sum(s.end - s.start for w in (work_a, work_b) for s in w.shards)
        with a.store.engine.connect() as db:
            assert db.execute(text("SELECT total_samples FROM runs WHERE run_id = 't'")).scalar() == samples
        b.coordinator.registry.ban(alice.node_id, "test")
        a.coordinator.sync_with_store()  # what a does every flush interval: it re-reads the bans
        assert code_of(lambda: alice.heartbeat()) == grpc.StatusCode.PERMISSION_DENIED


# ---------------------------------------------------------------- TLS


def test_the_api_speaks_only_tls_and_nodes_pin_its_certificate(tmp_path):
    """Issue 12, point 10: TLS with a certificate made at first start; nodes pin it by fingerprint or trust it on
    first use, and refuse clearly when it changes; the admin token never crosses the wire in plaintext."""
    known = tmp_path / "known_coordinators.json"
    with ServerThread(tmp_path / "a", run_toml()) as first:
        address = parse_target(first.address).address
        with grpc.insecure_channel(address) as plaintext:  # what an old client or a sniffable admin call would use
            with pytest.raises(grpc.RpcError) as info:
                rpc.AdminStub(plaintext).ListValidators(pb.ListValidatorsRequest(), timeout=5,
                                                        metadata=(("authorization", f"Bearer {first.admin_token}"),))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # trust on first use: the fingerprint is remembered for the address
        client = CoordinatorClient(address, generate_key(), attempts=1, known=known)
        assert client.list_runs()
        assert json.loads(known.read_text()) == {address: parse_target(first.address).pin}
        # a pin that is not the certificate's is refused before anything is sent
        wrong = f"{address}#sha256:{'0' * 64}"
        with pytest.raises(CertificateRefused, match="not the pinned"):
            CoordinatorClient(wrong, generate_key(), attempts=1, known=known).list_runs()
        port = int(address.rsplit(":", 1)[1])
    # another coordinator (another key and certificate) on the same address: the node refuses it
    with ServerThread(tmp_path / "b", run_toml(), grpc_port=port) as second:
        assert second.address != first.address and parse_target(second.address).address == address
        with pytest.raises(CertificateRefused, match="was seen there before"):
            CoordinatorClient(address, generate_key(), attempts=1, known=known).list_runs()
        assert CoordinatorClient(second.address, generate_key(), attempts=1, known=known).list_runs()  # pinned: fine
