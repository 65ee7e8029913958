"""`omi-coordinator` as a real process: durability across kill -9, graceful SIGTERM, the admin CLI, the HTTP side."""

import json
import signal
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from coordinator_helpers import contribution_for, free_port
from omi.node.client import CoordinatorClient
from omi.protos import pb
from omi.protos.peer_ids import new_identity
from omi.protos.signing import generate_key
from processes import DIGITS, ServeProcess, cli, kill_group

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

BIN = Path(sys.executable).parent


@pytest.fixture
def serve(tmp_path):
    processes = []

    def start(validator: bool = False, swarm: bool = True) -> ServeProcess:
        """``omi-coordinator serve``; without ``swarm`` (``--swarm-host ''``) its runs have no bootstrap peer, witness
        or built-in validator: the tests of what the coordinator itself stores and answers skip their start (about
        15 CPU-seconds of imports each time, scripts/cpu_by_process.py)."""
        extra = ("--validator",) if validator else ()
        process = ServeProcess(tmp_path / "state", tmp_path / "serve.log", grpc_port=grpc_port, http_port=http_port,
                               extra=extra if swarm else (*extra, "--swarm-host", ""), witness=False)
        processes.append(process)
        return process

    grpc_port, http_port = free_port(), free_port()
    yield start
    for p in processes:
        kill_group(p.proc)


def test_acknowledged_writes_survive_kill_9(serve, tmp_path):
    server = serve(swarm=False)
    state = tmp_path / "state"
    assert (state / "admin_token").stat().st_mode & 0o777 == 0o600
    assert (state / "coordinator_key.pem").stat().st_mode & 0o777 == 0o600

    keys = [generate_key() for _ in range(2)]  # a round hands each 2 × H micro-batches: digits has room for two
    nodes = [CoordinatorClient(server.address, k, attempts=1) for k in keys]
    works, contributions = [], []
    for i, node in enumerate(nodes):
        spec = node.register("digits", new_identity(), display_name=f"n{i}").run_spec  # the default: rounds
        works.append(node.get_work(0))
        contributions.append(contribution_for(works[-1], spec))
        assert node.report_contribution(contributions[-1]).accepted
    banned = CoordinatorClient(server.address, generate_key(), attempts=1)
    banned.register("digits", new_identity())
    assert cli("node", "ban", banned.node_id, "--reason", "test", "-c", server.address, "--state-dir", state) \
        .returncode == 0
    extra = tmp_path / "extra.toml"
    extra.write_text(DIGITS.read_text().replace('id = "digits"', 'id = "extra"'))
    created = cli("run", "create", extra, "-c", server.address, "--state-dir", state)
    assert created.returncode == 0 and "extra" in created.stdout

    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    server = serve(swarm=False)

    status = nodes[0].get_run_status("digits")
    assert status.contributions == len(nodes)
    assert status.summary.total_samples == sum(c.samples for c in contributions)
    assert {r.run_id: r.state for r in nodes[0].list_runs()} == {"digits": pb.RUN_STATE_RUNNING,
                                                                   "extra": pb.RUN_STATE_CREATED}
    for node, work, contribution in zip(nodes, works, contributions, strict=True):
        assert node.heartbeat().run_state == pb.RUN_STATE_RUNNING  # the token still checks out: same key
        assert node.get_work(0) == work
        with pytest.raises(grpc.RpcError) as info:
            node.report_contribution(contribution)
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as info:
        banned.renew_token()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED

    runs = json.load(urllib.request.urlopen(f"{server.http}/api/runs", timeout=10))
    assert {r["run_id"]: int(r["total_samples"]) for r in runs}["digits"] == status.summary.total_samples
    assert json.load(urllib.request.urlopen(f"{server.http}/healthz", timeout=10)) == {"status": "ok"}

    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    assert "coordinator stopped" in server.log.read_text()


def test_admin_cli(serve, tmp_path):
    server = serve(swarm=False)
    state = tmp_path / "state"
    bad = tmp_path / "bad.toml"
    bad.write_text(DIGITS.read_text().replace('id = "digits"', 'id = "other"').replace("seed = 0", "seeds = 0"))
    result = cli("run", "create", bad, "-c", server.address, "--state-dir", state)
    assert result.returncode != 0 and "training.seeds" in result.stderr and "Traceback" not in result.stderr

    result = cli("run", "pause", "digits", "-c", server.address, "--state-dir", tmp_path / "nowhere")
    assert result.returncode != 0 and "admin token" in result.stderr and "Traceback" not in result.stderr
    result = cli("run", "pause", "digits", "-c", server.address, env={"OMI_ADMIN_TOKEN": "wrong"})
    assert result.returncode != 0 and "UNAUTHENTICATED" in result.stderr

    token_file = state / "admin_token"
    result = cli("run", "pause", "digits", "-c", server.address, "--admin-token-file", token_file)
    assert result.returncode == 0 and "paused" in result.stdout
    result = cli("run", "pause", "digits", "-c", server.address, "--state-dir", state)
    assert result.returncode != 0 and "FAILED_PRECONDITION" in result.stderr
    assert cli("run", "resume", "digits", "-c", server.address, "--state-dir", state).returncode == 0
    assert cli("run", "stop", "digits", "-c", server.address, "--state-dir", state).returncode == 0
    listed = cli("run", "list", "-c", server.address)
    assert listed.returncode == 0 and "stopped" in listed.stdout

    node_id = "ab" * 32
    granted = cli("validator", "grant", node_id, "--reason", "lab GPU", "-c", server.address, "--state-dir", state)
    assert granted.returncode == 0 and "is a validator" in granted.stdout, granted.stderr
    listed = cli("validator", "list", "-c", server.address, "--state-dir", state)
    assert listed.returncode == 0 and node_id[:12] in listed.stdout and "lab GPU" in listed.stdout
    bad = cli("validator", "grant", "nope", "-c", server.address, "--state-dir", state)
    assert bad.returncode != 0 and "64 hex" in bad.stderr and "Traceback" not in bad.stderr
    revoked = cli("validator", "revoke", node_id, "-c", server.address, "--state-dir", state)
    assert revoked.returncode == 0 and "no longer a validator" in revoked.stdout


def test_a_run_the_admin_starts_gets_its_own_swarm_peer(serve, tmp_path):
    server = serve(validator=True)
    extra = tmp_path / "extra.toml"
    extra.write_text(DIGITS.read_text().replace('id = "digits"', 'id = "extra"'))
    assert cli("run", "create", extra, "--start", "-c", server.address, "--state-dir", tmp_path / "state") \
        .returncode == 0
    digits = CoordinatorClient(server.address, generate_key(), attempts=1).register("digits", new_identity()).run_spec
    # the run's peer (a process of its own) may still be starting: the node is told UNAVAILABLE and retries
    node = CoordinatorClient(server.address, generate_key(), attempts=8)
    spec = node.register("extra", new_identity()).run_spec
    assert len(spec.initial_peers) == len(digits.initial_peers) == 1
    assert spec.initial_peers[0] != digits.initial_peers[0]  # one bootstrap peer per run
    assert node.get_work(0).shards  # its data source opened too
    # and its own built-in validator, granted the role (without one nothing of the run would become verified)
    listed = cli("validator", "list", "-c", server.address, "--state-dir", tmp_path / "state")
    assert listed.stdout.count("built-in validator of run") == 2, listed.stdout + listed.stderr
    assert (tmp_path / "state" / "validator" / "extra" / "validator.log").exists()
