"""Segments of a round (omi.models.segments): an honest segment replays bitwise; skipped steps and other data do not."""

from __future__ import annotations

import pytest
import torch
from omi.models import GradientSketch, build_for_spec, micro_batch_seed, model_info, open_source
from omi.models.optimizer import optimizer_for
from omi.models.replay import recompute
from omi.models.segments import (
    SPILL_BYTES,
    RoundStates,
    SegmentStep,
    load_training_state,
    replay_segment,
    training_state,
    training_state_hash,
)
from omi.protos.runspec import parse_runspec

SPEC = parse_runspec('[run]\nid = "seg"\nmodel = "unet-digits-16"\n[training]\nmicro_batch_size = 8\n'
                     '[rounds]\ninner_steps = 6\n[verification]\nsegment_steps = 3\n')
STEPS = 6


@pytest.fixture(scope="module")
def parts():
    torch.set_num_threads(1)
    model, scheduler = build_for_spec(SPEC)
    source = open_source(SPEC.data, channels=model_info(SPEC.model).channels)
    steps = [SegmentStep(index=i, samples=list(range(8 * i, 8 * i + 8)),
                         seed=micro_batch_seed(SPEC.training.seed, SPEC.run_id, 0, "node", i)) for i in range(STEPS)]
    return model, scheduler, source, steps


def _node_round(parts, *, skip: set[int] = frozenset(), other_data: bool = False):
    """A node's round of STEPS inner steps from the run's initial model: (records, states at steps 0, 3, 6)."""
    model, scheduler, source, steps = parts
    model = build_for_spec(SPEC)[0]
    optimizer = optimizer_for(SPEC.training)(model.parameters())
    sketch = GradientSketch(model, SPEC.verification.sketch_size, seed=SPEC.training.seed)
    records, states = [], [training_state(model, optimizer)]
    for step in steps:
        samples = [s + 1000 for s in step.samples] if other_data else step.samples
        record = recompute(model, scheduler, source, samples, step.seed, "epsilon", sketch, index=step.index,
                           keep_grad=True)
        if step.index not in skip:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        records.append(record)
        if (step.index + 1) % SPEC.verification.segment_steps == 0:
            states.append(training_state(model, optimizer))
    return records, states


def _replay(parts, start: dict, segment: int):
    """A validator's replay of one segment from the node's start state: (records, end state hash)."""
    _, scheduler, source, steps = parts
    model = build_for_spec(SPEC)[0]
    optimizer = optimizer_for(SPEC.training)(model.parameters())
    load_training_state(model, optimizer, start)
    k = SPEC.verification.segment_steps
    records = replay_segment(model, optimizer, scheduler, source, steps[segment * k:(segment + 1) * k],
                             prediction_type="epsilon", sketch=None)
    return records, training_state_hash(training_state(model, optimizer))


def test_an_honest_segment_replays_bitwise(parts):
    records, states = _node_round(parts)
    for segment in (0, 1):  # the first starts at θ_r with the optimizer statistics carried into the round
        replayed, end = _replay(parts, states[segment], segment)
        assert end == training_state_hash(states[segment + 1])
        assert [r.loss for r in replayed] == [r.loss for r in records[3 * segment:3 * segment + 3]]


def test_skipped_inner_steps_do_not_reach_the_committed_end_state(parts):
    _, states = _node_round(parts, skip={4})  # claims 3 steps in segment 1, took 2
    _, end = _replay(parts, states[1], 1)
    assert end != training_state_hash(states[2])


def test_training_on_other_data_gives_other_records(parts):
    records, states = _node_round(parts, other_data=True)
    replayed, end = _replay(parts, states[0], 0)
    assert end != training_state_hash(states[1])
    assert all(abs(a.loss - b.loss) > 1e-6 for a, b in zip(replayed, records[:3], strict=True))


def test_a_state_that_does_not_fit_the_model_is_refused(parts):
    model = build_for_spec(SPEC)[0]
    optimizer = optimizer_for(SPEC.training)(model.parameters())
    state = training_state(model, optimizer)
    state["intruder.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="does not fit"):
        load_training_state(model, optimizer, state)


# ---------------------------------------------------------------- a validator's segment audit, node state over P2P

def _assignment():
    from omi.protos import pb

    return pb.WorkAssignment(shards=[pb.ShardRange(shard_id=0, start=0, end=64)], seed=11, micro_batch_size=8)


def _delta_sketch(states, scale: float = 1.0) -> list[float]:
    """The node's committed sketch of its pseudo-gradient θ_r − θ_end (node/trainer.py), optionally scaled."""
    model = build_for_spec(SPEC)[0]
    sketch = GradientSketch(model, SPEC.verification.sketch_size, seed=SPEC.training.seed)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    delta = [scale * (states[0][n].float() - states[-1][n].float()) for n in names]
    return sketch.of_grads(delta, delta).tolist()


def _audit_task(records, states, segment: int, peer_id: str, params_hash: bytes, delta_sketch=()):
    from omi.models import merkle_root
    from omi.models.records import audited_record
    from omi.protos import pb

    k = SPEC.verification.segment_steps
    indices = list(range(segment * k, (segment + 1) * k))
    return pb.AuditTask(task_id="t" * 8, run_id=SPEC.run_id, node_id="node", round=0, params_hash=params_hash,
                        assignment=_assignment(), micro_batch_indices=indices, has_task=True,
                        records=[audited_record(records, i) for i in indices], commitment=merkle_root(records),
                        micro_batches=len(records), peer_id=peer_id,
                        segment_hashes=[training_state_hash(s) for s in states], delta_sketch=delta_sketch)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("cheat", ["honest", "skips_a_step", "other_data", "end_elsewhere", "delta_elsewhere"])
def test_a_validator_replays_a_segment_from_the_state_the_node_serves(swarm_dht, parts, cheat, tmp_path):
    from omi.models import micro_batch_samples, params_hash
    from omi.node.parameter_history import ParameterHistory
    from omi.node.recompute import Recomputer
    from omi.swarm.params_p2p import ParamsFetcher, ParamsServer

    swarm_spec, _bootstrap, (node_dht, validator_dht) = swarm_dht
    model, scheduler, source, _ = parts
    steps = [SegmentStep(index=i, samples=micro_batch_samples(_assignment(), i, 8),
                         seed=micro_batch_seed(SPEC.training.seed, SPEC.run_id, 0, "node", i)) for i in range(STEPS)]
    records, states = _node_round((model, scheduler, source, steps), skip={4} if cheat == "skips_a_step" else set(),
                                  other_data=cheat == "other_data")
    if cheat == "end_elsewhere":  # honest records, but it commits to (and serves) an end state of its own making
        states[2] = {name: t + 1e-3 if "|" not in name else t for name, t in states[2].items()}
    theta = build_for_spec(SPEC)[0]
    server = ParamsServer.start(node_dht, swarm_spec, keep=8)
    fetcher = ParamsFetcher(validator_dht, swarm_spec, timeout=20)
    try:
        # the node holds its audited round's states; the honest one as a node with a large model does: spilled to
        # disk during the round, the files handed to the server, which streams them from disk
        held = RoundStates(tmp_path / "segments", spill_bytes=0 if cheat == "honest" else SPILL_BYTES)
        for state in states:
            held.add(state)
        held.hand_over(server)
        held.discard()
        assert len(list((tmp_path / "segments").glob("round-*/*.safetensors"))) == (
            len({training_state_hash(s) for s in states}) if cheat == "honest" else 0)
        # every task carries the round's committed Δ sketch; "delta_elsewhere" commits to (and would send) 2 × Δ
        delta_sketch = _delta_sketch(states, 2.0 if cheat == "delta_elsewhere" else 1.0)
        task = _audit_task(records, states, 1, node_dht.peer_id.to_base58(), params_hash(theta), delta_sketch)
        verdict = Recomputer.for_spec(SPEC).check_segment(task, ParameterHistory(5), fetcher)
    finally:
        fetcher.shutdown()
        server.shutdown()
    assert verdict is not None
    if cheat == "honest":
        assert verdict.passed, verdict.reason
        assert len(verdict.checks) == SPEC.verification.segment_steps and verdict.params_from_node
    else:
        # skipping step 4 moves what step 5 computes on (its record), other data changes every record
        assert not verdict.passed
        if cheat == "delta_elsewhere":  # every inner step and the end state check out; Δ does not
            assert "pseudo-gradient is not θ_r − the committed end state" in verdict.reason, verdict.reason
            assert all(c.passed for c in verdict.checks)
            return
        if cheat == "end_elsewhere":
            assert "optimizer steps from the committed end state" in verdict.reason, verdict.reason
            return
        assert "differs" in verdict.reason, verdict.reason
        failed = [c.index for c in verdict.checks if not c.passed]
        assert failed == ([5] if cheat == "skips_a_step" else [3, 4, 5])


def test_round_states_spill_to_disk_and_the_params_server_deletes_what_it_drops(tmp_path):
    from omi.swarm.params_p2p import ParamsServer
    from safetensors.torch import load

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    small = RoundStates(tmp_path, spill_bytes=SPILL_BYTES)
    assert isinstance(small.held(small.add(training_state(model, optimizer))), dict)  # a toy stays in memory
    states = RoundStates(tmp_path, spill_bytes=0)
    digests = []
    for _ in range(3):
        model(torch.ones(1, 4)).sum().backward()
        optimizer.step()
        digests.append(states.add(training_state(model, optimizer)))
    files = sorted(tmp_path.glob("round-*/*.safetensors"))
    assert len(files) == 3 and states.hashes == digests
    server = ParamsServer(dht=None, access=None, keep=2)
    states.hand_over(server)
    states.discard()  # handed over: the files stay with the server
    # keep=2: the oldest state was dropped and its file deleted; the others load and hash as committed
    assert server.get(digests[0]) is None and not _spilled(tmp_path, digests[0])
    for digest in digests[1:]:
        assert _spilled(tmp_path, digest) and training_state_hash(load(server.get(digest))) == digest
    server.shutdown()  # a node that ends leaves no state on disk
    assert list(tmp_path.glob("round-*")) == []

    killed = RoundStates(tmp_path / "segments", spill_bytes=0)  # a node killed mid-round leaves its states behind
    killed.add(training_state(model, optimizer))
    assert list((tmp_path / "segments").glob("round-*/*"))
    RoundStates.clean(tmp_path / "segments")  # what the node's trainer does when it starts again
    assert list((tmp_path / "segments").glob("round-*")) == []


def _spilled(folder, digest: bytes) -> bool:
    return bool(list(folder.glob(f"round-*/{digest.hex()}.safetensors")))
