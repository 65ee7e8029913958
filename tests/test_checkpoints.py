"""The checkpointer in a real swarm on loopback: checkpoints while volunteers train, retention, resume of an emptied
swarm from the latest checkpoint, and a coordinator killed (SIGKILL) in the middle of writing one."""

import json
import re
import sqlite3

import pytest
from omi.models import load_pretrained, params_hash
from omi.node.client import CoordinatorClient
from omi.protos import signing
from omi.protos.manifest import verify_folder, verify_manifest
from processes import NodeProcess, ServeProcess, fast_run, kill_group, run_node, wait_until

pytestmark = [pytest.mark.slow]

CHECKPOINTS = dict(every_rounds=1, keep=2, milestone_every=3, preview_samples=4)


def expected_retention(written: list[int], keep: int, milestone_every: int) -> list[int]:
    """What the RunSpec asks for, spelled out independently: the last `keep` written, plus each checkpoint that is
    the first at or after a multiple of `milestone_every`."""
    milestones, previous = set(), 0
    for round_number in written:
        if round_number // milestone_every > previous // milestone_every:
            milestones.add(round_number)
        previous = round_number
    return sorted(set(written[-keep:]) | milestones)


@pytest.fixture
def run_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(fast_run(checkpoints=CHECKPOINTS))
    return path


@pytest.mark.timeout(480)
def test_checkpoints_during_training_retention_and_resume(run_file, tmp_path):
    server = ServeProcess(tmp_path / "coordinator", tmp_path / "coordinator.log", run_file=run_file)
    client = CoordinatorClient(server.address, signing.generate_key(), attempts=3)
    public_key = client.get_run_spec("digits").coordinator_public_key
    nodes = [NodeProcess(server.address, tmp_path / f"node-{i}", "--max-rounds", 4) for i in range(2)]
    for node in nodes:
        assert node.wait(timeout=300) == 0, node.output()[-3000:]
    # the checkpointer settles: it wrote the last round its witness confirmed (the database's round states; a round
    # the witness caught up with unconfirmed gets no checkpoint). Waiting only for the run's round minus one let the
    # last checkpoint land between the listing and the checks below (seen twice, 2026-12-07)
    run_round = client.get_run_status("digits").summary.round

    def written_rounds() -> list[int]:
        return [int(e) for e in re.findall(r"checkpoint of round (\d+) written", server.log.read_text())]

    def last_confirmed() -> int:
        with sqlite3.connect(server.state_dir / "coordinator.db") as db:
            return db.execute("SELECT MAX(round) FROM round_states").fetchone()[0] or 0

    wait_until(lambda: max(written_rounds(), default=-1) >= last_confirmed(), 90, "the checkpointer to settle")

    # every checkpoint written while the swarm trained; retention kept exactly what the RunSpec says
    written = written_rounds()
    assert len(written) >= 2 and written == sorted(written), written
    listed = client.list_checkpoints("digits")
    assert [c.round for c in listed] == expected_retention(written, keep=2, milestone_every=3)
    on_disk = sorted(int(p.name.split("-")[1]) for p in (server.state_dir / "checkpoints" / "digits").iterdir())
    assert on_disk == [c.round for c in listed]

    # the latest downloads, verifies and loads with stock diffusers; its manifest agrees with the ledger
    latest = listed[-1]
    out = tmp_path / "latest"
    result = run_node("download", "digits", "--out", out, "--coordinator", server.address, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["round"] == latest.round and verify_manifest(manifest, public_key)
    from diffusers import DDPMPipeline
    images = DDPMPipeline.from_pretrained(out)(batch_size=2, num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 16, 16, 1)
    before = [c for c in server.contributions() if c.round < latest.round]
    # the manifest holds the ledger as it was when the checkpoint was written; a contribution of an earlier round
    # may still arrive after that (a slow node reports late), so the ledger can only have grown since
    assert 0 < manifest["total_samples"] == latest.total_samples <= sum(c.samples for c in before)
    assert {c["node_id"] for c in manifest["contributors"]} <= {c.node_id for c in before}
    assert manifest["contributors"]
    assert manifest["data_shards"] and (out / "preview.png").stat().st_size > 0
    assert manifest["params_hash"] == params_hash(load_pretrained(out)[0]).hex()

    # every volunteer left: a new one starts from the latest checkpoint, at its round (the run's never goes back)
    newcomer = NodeProcess(server.address, tmp_path / "newcomer")  # trains until this test is done with it
    old_nodes = {c.node_id for c in server.contributions()}

    def newcomers_contributions():
        assert newcomer.proc.poll() in (None, 0), newcomer.output()[-3000:]
        return [c for c in server.contributions() if c.node_id not in old_nodes]

    first = min(wait_until(newcomers_contributions, 240, "the newcomer's first contribution", 1),
                key=lambda c: c.round)
    # it resumes at the checkpoint's round. Volunteers that leave withdraw their progress records (withdraw_progress);
    # before that, their records counted for a minute and closed that round before the newcomer trained a step in it
    # (seen twice in three runs, 2026-12-07; since the fix it trained the checkpoint's round at once, 114 s instead
    # of 147-234 s). A record whose withdrawal could not be stored still expires on its own: then the first
    # contribution is of the next round, from the same θ (the newcomer sat that round out, no outer step was taken)
    resumed_at = max(latest.round, run_round)
    assert first.round in (resumed_at, resumed_at + 1), (first.round, resumed_at)
    # it trained from the weights of the newest checkpoint when it joined (no peer was left to serve a state): the
    # one downloaded above, or one the checkpointer wrote since (seen: the run's last round written after the
    # download, as the settling condition also accepts the round before)
    resumed = max((c for c in client.list_checkpoints("digits") if c.round <= first.round), key=lambda c: c.round)
    resumed_manifest = json.loads((server.state_dir / "checkpoints" / "digits" / f"round-{resumed.round:08d}" /
                                   "manifest.json").read_text())
    assert first.params_hash.hex() == resumed_manifest["params_hash"], newcomer.output()[-3000:]
    # the run's round is what the coordinator's own swarm peer observes (the round at least half the trainers'
    # progress records in the DHT report), not what a contribution says. The records of the volunteers that left
    # stay until they expire (60 s after their last refresh), so the newcomer keeps training (refreshing its own)
    # until the run's round has followed it (seen on CI when it left at once: every record expired in the wait)
    wait_until(lambda: client.get_run_status("digits").summary.round >= first.round, 120,
               f"the run's round to reach the newcomer's {first.round}")
    kill_group(newcomer.proc)
    kill_group(server.proc)


@pytest.mark.timeout(420)
def test_coordinator_killed_mid_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    run_file = tmp_path / "run.toml"
    run_file.write_text(fast_run(checkpoints=CHECKPOINTS))
    state = tmp_path / "coordinator"
    monkeypatch.setenv("OMI_CHECKPOINT_STALL", "3:600")  # the checkpointer's hook: hang once weights are written
    server = ServeProcess(state, tmp_path / "coordinator.log", run_file=run_file)
    monkeypatch.delenv("OMI_CHECKPOINT_STALL")
    node = NodeProcess(server.address, tmp_path / "node", "--max-rounds", 8)
    wait_until(lambda: "stalling the write of checkpoint" in server.log.read_text(), 300, "a stalled checkpoint write")
    run_folder = state / "checkpoints" / "digits"
    assert list(run_folder.glob(".tmp-*")), "the kill must land mid-write"
    kill_group(server.proc)  # coordinator, checkpointer and its swarm peer: SIGKILL
    kill_group(node.proc)
    with sqlite3.connect(state / "coordinator.db") as db:
        listed_before = [row[0] for row in db.execute("SELECT round FROM checkpoints ORDER BY round")]
    assert listed_before and max(listed_before) < 3, listed_before

    restarted = ServeProcess(state, tmp_path / "restarted.log", run_file=run_file, witness=False)
    wait_until(lambda: "removing unfinished" in restarted.log.read_text(), 120, "the checkpointer's repair")
    assert not list(run_folder.glob(".tmp-*"))
    client = CoordinatorClient(restarted.address, signing.generate_key(), attempts=3)
    assert [c.round for c in client.list_checkpoints("digits")] == listed_before
    key = client.get_run_spec("digits").coordinator_public_key
    for round_number in listed_before:
        assert verify_folder(run_folder / f"round-{round_number:08d}", key) is not None
    result = run_node("download", "digits", "--out", tmp_path / "after", "--coordinator", restarted.address)
    assert result.returncode == 0, result.stdout + result.stderr
    kill_group(restarted.proc)
