"""Refusals are typed: each ``pb.Refusal`` the coordinator gives reaches the node over real gRPC, read by
:func:`omi.protos.refusals.refusal_of`, and decides what the node does; a ban's kind is a column, not its wording."""

import threading

import grpc
import pytest
import torch
from coordinator_helpers import FakeClock, ServerThread, contribution_for, run_toml, trainer
from omi.coordinator.states import BanKind
from omi.coordinator.store import Ban, Store, sqlite_url
from omi.models import MicroBatchRecord, merkle_root, record_to_proto, sent_sketch
from omi.node.cli import app
from omi.node.client import CoordinatorClient
from omi.node.session import NodeError, NodeSession
from omi.node.trainer import PAUSED_POLL, RunStopped
from omi.protos import pb
from omi.protos.peer_ids import new_identity
from omi.protos.refusals import refusal_of
from omi.protos.signing import generate_key
from processes import wait_until
from sqlalchemy import create_engine, select, text
from typer.testing import CliRunner

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server(tmp_path):
    with ServerThread(tmp_path / "state", run_toml()) as s:
        yield s


def refusal(call) -> tuple[grpc.StatusCode, str]:
    """The status code and the name of the refusal the node reads from ``call``'s error."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), pb.Refusal.Name(refusal_of(info.value))


# ---------------------------------------------------------------- the run

def test_a_stopped_run_refuses_work_renewal_and_registration_with_run_stopped_and_the_node_leaves(server, tmp_path):
    node, volunteer = server.node(), trainer(server, tmp_path)
    server.admin_call("StopRun", pb.RunRequest(run_id="t"))
    stopped = (grpc.StatusCode.FAILED_PRECONDITION, "REFUSAL_RUN_STOPPED")
    assert refusal(lambda: node.get_work(0)) == stopped
    assert refusal(node.renew_token) == stopped
    assert refusal(lambda: server.node()) == stopped
    with pytest.raises(RunStopped):
        volunteer._get_work(0)


def test_a_round_past_the_runs_end_is_refused_with_run_ended_and_the_node_leaves(tmp_path):
    with ServerThread(tmp_path / "state", run_toml().replace("[training]", "[training]\nmax_rounds = 2")) as server:
        node, volunteer = server.node(), trainer(server, tmp_path)
        assert node.get_work(1).shards
        assert refusal(lambda: node.get_work(2)) == (grpc.StatusCode.FAILED_PRECONDITION, "REFUSAL_RUN_ENDED")
        with pytest.raises(RunStopped):
            volunteer._get_work(2)


def test_a_created_or_paused_run_refuses_work_with_run_not_running(server):
    server.admin_call("CreateRun", pb.CreateRunRequest(spec_toml=run_toml("later")))
    node = server.node("later")
    not_running = (grpc.StatusCode.FAILED_PRECONDITION, "REFUSAL_RUN_NOT_RUNNING")
    assert refusal(lambda: node.get_work(0)) == not_running
    server.admin_call("ResumeRun", pb.RunRequest(run_id="later"))
    server.admin_call("PauseRun", pb.RunRequest(run_id="later"))
    assert refusal(lambda: node.get_work(0)) == not_running


def test_a_volunteer_waits_while_its_run_is_paused_and_trains_once_it_resumes(server, tmp_path):
    volunteer = trainer(server, tmp_path)
    server.admin_call("PauseRun", pb.RunRequest(run_id="t"))
    waiting = threading.Thread(target=lambda: got.append(volunteer._get_work(0)))
    got: list[pb.WorkAssignment] = []
    waiting.start()
    try:
        wait_until(lambda: volunteer.status.state == "paused", 10, "the volunteer to wait in 'paused'")
        assert not got  # it waits, rather than leaving or crashing on the refusal
        server.admin_call("ResumeRun", pb.RunRequest(run_id="t"))
        waiting.join(timeout=3 * PAUSED_POLL + 5)
        assert got and got[0].shards and got[0].round == 0
    finally:
        volunteer.stop.set()
        waiting.join(timeout=10)


def test_an_unknown_run_is_refused_with_unknown_run_and_join_and_download_exit_4(server, tmp_path):
    client = CoordinatorClient(server.address, generate_key(), attempts=1)
    unknown = (grpc.StatusCode.NOT_FOUND, "REFUSAL_UNKNOWN_RUN")
    assert refusal(lambda: client.register("nope", new_identity())) == unknown
    assert refusal(lambda: client.list_checkpoints("nope")) == unknown
    with pytest.raises(NodeError) as info:
        NodeSession(server.address, tmp_path / "node", connect_attempts=1).open(run_id="nope")
    assert info.value.exit_code == 4
    result = CliRunner().invoke(app, ["download", "nope", "--coordinator", server.address,
                                      "--state-dir", str(tmp_path / "download")])
    assert result.exit_code == 4, result.output


# ---------------------------------------------------------------- the node

def test_a_banned_node_and_its_peer_id_are_refused_with_banned_and_the_node_exits_5(server, tmp_path):
    volunteer = trainer(server, tmp_path)
    identity, key = new_identity(), generate_key()
    node = CoordinatorClient(server.address, key, attempts=1)
    node.register("t", identity)
    other = CoordinatorClient(server.address, generate_key(), attempts=1)
    taken = (grpc.StatusCode.PERMISSION_DENIED, "REFUSAL_UNSPECIFIED")  # one peer id, one identity: not a ban
    assert refusal(lambda: other.register("t", identity)) == taken
    for node_id in (node.node_id, volunteer.session.node_id):
        server.admin_call("BanNode", pb.BanNodeRequest(node_id=node_id, reason="test"))
    banned = (grpc.StatusCode.PERMISSION_DENIED, "REFUSAL_BANNED")
    assert refusal(lambda: node.get_work(0)) == banned
    assert refusal(node.renew_token) == banned
    assert refusal(lambda: node.heartbeat()) == banned
    assert refusal(lambda: CoordinatorClient(server.address, key, attempts=1).register("t", new_identity())) == banned
    assert refusal(lambda: other.register("t", identity)) == banned  # a ban covers the node's peer id
    with pytest.raises(NodeError) as info:
        volunteer._get_work(0)
    assert info.value.exit_code == 5 and volunteer.session.refused


def test_an_expired_token_is_refused_with_token_expired(tmp_path):
    clock = FakeClock()
    with ServerThread(tmp_path / "state", run_toml(token_ttl=30.0), clock=clock) as server:
        node = server.node()
        clock.advance(30.1)  # within the allowed clock skew of the node's timestamps
        assert refusal(lambda: node.get_work(0)) == (grpc.StatusCode.UNAUTHENTICATED, "REFUSAL_TOKEN_EXPIRED")
        node.renew_token()
        assert node.get_work(0).shards


def test_other_refusals_name_no_reason(server):
    # a refusal nobody acts on by its reason carries none: the status code says enough
    node = server.node()
    assert refusal(lambda: node.get_work(10**6)) == (grpc.StatusCode.UNAVAILABLE, "REFUSAL_UNSPECIFIED")


# ---------------------------------------------------------------- the kind of a ban

def audited_round(server, node: CoordinatorClient, seed: int) -> None:
    """``node`` reports round 0 of two inner steps, which the coordinator audits, and hands over its records."""
    spec = server.coordinator.runs.get("t").spec
    generator = torch.Generator().manual_seed(seed)
    records = [MicroBatchRecord(i, 32, 0.5, 1.0, torch.randn(spec.verification.sketch_size, generator=generator))
               for i in range(2)]
    contribution = contribution_for(node.get_work(0), samples=64, micro_batches=2, mean_loss=0.5,
                                    commitment=merkle_root(records), gradient_sketch=sent_sketch(records).tolist(),
                                    segment_hashes=[bytes([i]) * 32 for i in range(2)])  # 2 steps: one segment
    reply = node.report_contribution(contribution)
    assert node.submit_audit_records(reply.audit_task_id, [record_to_proto(r) for r in records]).accepted


def test_re_examining_failed_audits_lifts_a_ban_for_them_not_an_admins_whatever_its_reason_says(tmp_path):
    with ServerThread(tmp_path / "state", run_toml(audit_rate=1.0, max_strikes=1)) as server:
        admins, audits, other = server.node(name="admin's"), server.node(name="audits'"), server.node(name="other")
        for seed, node in enumerate((admins, audits, other)):
            audited_round(server, node, seed)
        server.admin_call("BanNode", pb.BanNodeRequest(node_id=admins.node_id, reason="spam, and 2 failed audits"))
        liar, second = server.validator(name="liar", trusted=False), server.validator(name="second", trusted=False)
        own = server.validator(name="coordinator's own")
        names = {node.node_id: name for name, node in (("admins", admins), ("audits", audits), ("other", other))}

        def work_through(validator, fails: set[str]) -> None:
            while (task := validator.get_audit_task()).has_task:
                passed = names[task.node_id] not in fails
                validator.report_audit_verdict(pb.AuditVerdict(task_id=task.task_id, passed=passed,
                                                               reason="" if passed else "mismatch"))

        work_through(liar, {"admins", "audits", "other"})
        work_through(second, {"admins", "audits"})  # agrees on two failures (a ban for audits), disputes "other"
        with server.store.session() as s:
            assert {names[b.node_id]: b.kind for b in s.scalars(select(Ban))} == {
                "admins": BanKind.ADMIN, "audits": BanKind.FAILED_AUDITS}
        work_through(own, set())  # overturns the liar: every failure it decided is re-examined, its strike lifted
        registry = server.coordinator.registry
        assert registry.is_banned(admins.node_id) and not registry.is_banned(audits.node_id)


def test_a_database_from_before_ban_kinds_reads_each_bans_kind(tmp_path, db_url):
    url = db_url or sqlite_url(tmp_path)
    engine = create_engine(url)
    with engine.begin() as connection:  # the bans table as coordinators before Ban.kind created it
        connection.execute(text("CREATE TABLE bans (node_id VARCHAR(64) PRIMARY KEY, reason TEXT, "
                                "created_at_ms BIGINT)"))
        connection.execute(text("INSERT INTO bans VALUES ('" + "a" * 64 + "', '2 failed audits', 1), "
                                "('" + "b" * 64 + "', 'spam', 2)"))
    engine.dispose()
    store = Store(url)
    try:
        with store.session() as s:
            assert {b.node_id[0]: b.kind for b in s.scalars(select(Ban))} == {
                "a": BanKind.FAILED_AUDITS, "b": BanKind.ADMIN}
        Store(url).close()  # opened again: nothing left to add
    finally:
        store.close()
