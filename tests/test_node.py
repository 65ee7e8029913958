"""`omi-node join` end to end: real coordinator, real volunteers in a real hivemind swarm, all on 127.0.0.1."""

import json
import re
import signal
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from omi.models import build_model, load_pretrained
from omi.node.client import CoordinatorClient
from omi.protos import pb
from omi.protos.signing import generate_key
from processes import NodeProcess, kill_group, run_node, wait_until

pytestmark = [pytest.mark.slow]

REPORTED = re.compile(r"epoch (\d+): reported")  # a node's log line for an accepted contribution


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def relative_spread(folders) -> float:
    """Largest distance between two nodes' parameters, relative to how far training moved them from the init."""
    params = [flat_params(load_pretrained(folder)[0]) for folder in folders]
    init = flat_params(build_model("unet-digits-16", seed=0)[0])
    moved = min(float((p - init).norm()) for p in params)
    return max(float((a - b).norm()) for i, a in enumerate(params) for b in params[i + 1:]) / moved


@pytest.mark.timeout(420)
def test_three_volunteers_train_together(coordinator, tmp_path):
    epochs = 3

    def start(i: int) -> NodeProcess:
        return NodeProcess(coordinator.address, tmp_path / f"node-{i}", "--save", tmp_path / f"model-{i}")

    # a swarm forms over time: peers that start at the very same moment each see "no other peers" and take
    # their first step alone (a lasting offset); later joiners load the state of the running swarm instead
    nodes = [start(0)]
    wait_until(lambda: "state: training" in nodes[0].output(), 120, "the first volunteer training")
    nodes += [start(1), start(2)]

    def contributions_per_node() -> Counter:
        return Counter(c.node_id for c in coordinator.contributions())

    wait_until(lambda: len(counts := contributions_per_node()) == 3 and min(counts.values()) >= epochs, 300,
               f"every volunteer contributing {epochs} epochs")
    for node in nodes:
        node.proc.send_signal(signal.SIGINT)  # Ctrl-C, at the same moment: each leaves gracefully
    for node in nodes:
        assert node.wait(timeout=120) == 0, node.output()[-3000:]
        assert "left run digits" in node.output()

    ledger = coordinator.contributions()
    assert len({(c.node_id, c.epoch) for c in ledger}) == len(ledger)  # one contribution per node per epoch
    assert all(c.samples > 0 for c in ledger)
    first_epoch = [c.mean_loss for c in ledger if c.epoch == min(c.epoch for c in ledger)]
    last_epoch = [c.mean_loss for c in ledger if c.epoch == max(c.epoch for c in ledger)]
    assert sum(last_epoch) / len(last_epoch) < 0.7 * sum(first_epoch) / len(first_epoch), (first_epoch, last_epoch)

    # the swarm averaged: nodes hold (nearly) the same parameters. Stopped by one Ctrl-C each at the same moment,
    # a node may leave just before or after an optimizer step that the others took, so nodes one epoch apart
    # are compared too, with room for that one step (one of ~20 AdamW steps taken by then). Without
    # averaging, each node's AdamW steps would take it about as far from the others as from the init (~1).
    # Nodes at the same epoch are not bitwise equal in per-step mode: on 2 busy cores hivemind now and then averages
    # a part without a late peer's share ("Reducer: received 50% of input tensors") and each peer keeps its own
    # rounding of the float16 deltas (seen: 0.02-0.03 usually, 0.072 and 0.099 on 2026-12-03).
    saved = {i: json.loads((tmp_path / f"model-{i}" / "omi_node.json").read_text())["epoch"] for i in range(3)}
    for gap, bound in ((0, 0.15), (1, 0.25)):
        pairs = [(i, j) for i in saved for j in saved if i < j and abs(saved[i] - saved[j]) == gap]
        for i, j in pairs:
            spread = relative_spread([tmp_path / f"model-{i}", tmp_path / f"model-{j}"])
            assert spread < bound, (saved, i, j, spread)
    assert any(abs(saved[i] - saved[j]) <= 1 for i in saved for j in saved if i < j), f"nodes far apart: {saved}"
    # gradients were all-reduced across peers (on 2 shared cores, beside the coordinator's validator and
    # checkpointer, a round often gathers 2 of the 3; parameter averaging keeps the third close, as checked above)
    assert any(re.search(r"averaged with [23] peers", node.output()) for node in nodes)


@pytest.mark.timeout(420)
def test_churn_kill9_and_late_joiner(coordinator, tmp_path):
    first = NodeProcess(coordinator.address, tmp_path / "node-0")
    wait_until(lambda: "state: training" in first.output(), 120, "the first volunteer training")
    survivors = [first, NodeProcess(coordinator.address, tmp_path / "node-1")]
    victim = NodeProcess(coordinator.address, tmp_path / "victim")
    client = CoordinatorClient(coordinator.address, generate_key(), attempts=3)
    wait_until(lambda: client.get_run_status("digits").summary.volunteers_online == 3, 120, "3 volunteers online")
    wait_until(lambda: REPORTED.search(victim.output()), 120, "the victim's first contribution")
    kill_group(victim.proc)  # kill -9 of the whole machine: node, DHT, averagers, libp2p daemon
    killed_epoch = max(c.epoch for c in coordinator.contributions())

    # the coordinator notices the missed heartbeats; the survivors finish the epoch and go on without it
    wait_until(lambda: client.get_run_status("digits").summary.volunteers_online == 2, 60, "the victim offline")
    late = NodeProcess(coordinator.address, tmp_path / "late")

    wait_until(lambda: REPORTED.search(late.output()), 240, "the late joiner's first contribution")
    # the swarm goes on past the kill (a group that still held the victim first waits for its averaging timeout;
    # seen in CI: the late joiner reported one epoch after the kill, before the others had gone further)
    wait_until(lambda: len({c.node_id for c in coordinator.contributions() if c.epoch > killed_epoch + 1}) >= 2,
               180, f"two nodes contributing past epoch {killed_epoch + 1}")
    for node in [*survivors, late]:  # (a graceful leave is test_three_volunteers_train_together's; it takes ~10 s)
        assert node.proc.poll() is None, node.output()[-3000:]
        kill_group(node.proc)

    ledger = coordinator.contributions()
    by_node: dict[str, list[int]] = {}
    for c in ledger:
        by_node.setdefault(c.node_id, []).append(c.epoch)
    assert len(by_node) == 4
    survivor_epochs = [epochs for epochs in by_node.values() if max(epochs) > killed_epoch + 1]
    assert len(survivor_epochs) >= 2, f"the swarm did not go on after the kill at epoch {killed_epoch}: {by_node}"
    # the late joiner loaded the running swarm's state: its first contribution is not at epoch 0
    assert int(REPORTED.search(late.output()).group(1)) > 0, late.output()[-3000:]


def test_bad_input_is_a_clear_error(coordinator, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    attempts = {  # run side by side: each is a CLI start (imports) of several seconds
        # nothing listens on port 9: the node retries with backoff, says so, and gives up with exit code 3
        "unreachable": ("--coordinator", "127.0.0.1:9", "--state-dir", tmp_path / "a", "--connect-attempts", "2"),
        "no run": ("--coordinator", coordinator.address, "--run", "no-such-run", "--state-dir", tmp_path / "b"),
        "state dir": ("--coordinator", coordinator.address, "--state-dir", blocker / "state"),
        "device": ("--coordinator", coordinator.address, "--device", "tpu", "--state-dir", tmp_path / "c"),
    }
    with ThreadPoolExecutor(len(attempts)) as pool:
        results = dict(zip(attempts, pool.map(lambda args: run_node("join", *args, "--quiet"), attempts.values()),
                           strict=True))
    said = {name: result.stdout + result.stderr for name, result in results.items()}

    assert results["unreachable"].returncode == 3, said["unreachable"]
    assert "retrying" in said["unreachable"] and "cannot reach the coordinator at 127.0.0.1:9" in said["unreachable"]
    assert "Traceback" not in said["unreachable"]
    assert results["no run"].returncode == 4 and "no-such-run" in said["no run"], said["no run"]
    assert results["state dir"].returncode == 2 and "not writable" in said["state dir"], said["state dir"]
    assert blocker.read_text() == "not a folder"
    assert results["device"].returncode == 2 and "tpu" in said["device"], said["device"]
    # none of the refused nodes left a contribution or a registration behind that trains
    assert coordinator.contributions() == []
    assert CoordinatorClient(coordinator.address, generate_key()).list_runs()[0].state == pb.RUN_STATE_RUNNING
