"""The micro-batch function: bitwise determinism, accumulation, sketch linearity, commitment and the audit check."""

import dataclasses
import subprocess
import sys

import pytest
import torch
from omi.models import (
    GradientSketch,
    Tolerances,
    build_model,
    compare,
    compute_micro_batch,
    merkle_proof,
    merkle_root,
    micro_batch_seed,
    open_source,
    params_hash,
    recompute,
    record_bytes,
    verify_proof,
)
from omi.models.commitment import MerkleProof
from omi.protos import pb

DIGITS = pb.DataSpec(source="builtin:digits", shard_size=64, resolution=16)
MICRO_BATCH = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def setup():
    model, scheduler = build_model("unet-digits-16")
    source = open_source(DIGITS)
    sketch = GradientSketch(model, size=512, seed=3)
    return model, scheduler, source, sketch


def own_gradient(model, scheduler, batch, seed, sketch, prediction_type="epsilon"):
    model.zero_grad(set_to_none=True)
    record = compute_micro_batch(model, scheduler, batch, seed, prediction_type=prediction_type, sketch=sketch)
    return record, [p.grad.clone() for p in model.parameters()]


def test_micro_batch_seed_is_63_bit_and_depends_on_every_input():
    base = micro_batch_seed(0, "digits", 1, "node-a", 2)
    assert 0 <= base < 2**63 and base == micro_batch_seed(0, "digits", 1, "node-a", 2)
    variants = [micro_batch_seed(1, "digits", 1, "node-a", 2), micro_batch_seed(0, "other", 1, "node-a", 2),
                micro_batch_seed(0, "digits", 2, "node-a", 2), micro_batch_seed(0, "digits", 1, "node-b", 2),
                micro_batch_seed(0, "digits", 1, "node-a", 3)]
    assert len({base, *variants}) == 6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_recomputed_micro_batch_is_bitwise_equal(setup, prediction_type):
    model, scheduler, source, sketch = setup
    batch, seed = source.get(range(MICRO_BATCH)), micro_batch_seed(0, "digits", 0, "node-a", 0)
    first, grads1 = own_gradient(model, scheduler, batch, seed, sketch, prediction_type)
    second, grads2 = own_gradient(model, scheduler, batch, seed, sketch, prediction_type)
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads2, strict=True))
    assert record_bytes(first) == record_bytes(second)
    assert first.samples == MICRO_BATCH and first.grad_norm > 0 and first.sketch.dtype == torch.float32
    assert compare(first, second, Tolerances.exact()).passed


def test_different_seed_or_samples_give_a_different_gradient(setup):
    model, scheduler, source, sketch = setup
    seed = micro_batch_seed(0, "digits", 0, "node-a", 0)
    ref, grads = own_gradient(model, scheduler, source.get(range(MICRO_BATCH)), seed, sketch)
    other_seed, grads_seed = own_gradient(model, scheduler, source.get(range(MICRO_BATCH)), seed + 1, sketch)
    other_samples, grads_samples = own_gradient(model, scheduler, source.get(range(1, MICRO_BATCH + 1)), seed, sketch)
    for other, other_grads in ((other_seed, grads_seed), (other_samples, grads_samples)):
        assert not all(torch.equal(a, b) for a, b in zip(grads, other_grads, strict=True))
        assert other.loss != ref.loss and not torch.equal(other.sketch, ref.sketch)
        assert not compare(ref, other, Tolerances()).passed


def test_micro_batches_accumulate_into_grad_and_each_record_is_its_own(setup):
    model, scheduler, source, sketch = setup
    batches = [source.get(range(i * MICRO_BATCH, (i + 1) * MICRO_BATCH)) for i in range(2)]
    alone = [own_gradient(model, scheduler, b, seed, sketch) for seed, b in enumerate(batches)]
    model.zero_grad(set_to_none=True)
    together = [compute_micro_batch(model, scheduler, b, seed, prediction_type="epsilon", sketch=sketch)
                for seed, b in enumerate(batches)]
    # each record describes only its own micro-batch, even when grads were already accumulated
    assert record_bytes(together[1]) == record_bytes(alone[1][0])
    for param, g0, g1 in zip(model.parameters(), alone[0][1], alone[1][1], strict=True):
        assert torch.equal(param.grad, g0 + g1)
    # linearity: the sketch of the accumulated gradient is the sum of the micro-batch sketches
    summed, of_sum = together[0].sketch + together[1].sketch, sketch.of_model_grads(model)
    assert float((of_sum - summed).norm() / summed.norm()) < 1e-6


def test_sketch_is_linear_and_seeded():
    sketch = GradientSketch(100_000, size=1024, seed=0)
    g1, g2 = torch.randn(100_000), torch.randn(100_000)
    def close(a, b):  # float32 sums in another order: equal up to rounding, relative to the sketch's size
        return float((a - b).norm() / b.norm()) < 1e-6

    assert close(sketch.of_vector(g1 + g2), sketch.of_vector(g1) + sketch.of_vector(g2))
    assert close(sketch.of_vector(3 * g1), 3 * sketch.of_vector(g1))
    assert torch.equal(GradientSketch(100_000, 1024, seed=0).of_vector(g1), sketch.of_vector(g1))
    assert not torch.equal(GradientSketch(100_000, 1024, seed=1).of_vector(g1), sketch.of_vector(g1))
    # a CountSketch keeps the norm roughly (Johnson-Lindenstrauss)
    assert 0.8 < float(sketch.of_vector(g1).norm() / g1.norm()) < 1.2
    with pytest.raises(ValueError, match="flat vector of 100000"):
        sketch.of_vector(torch.zeros(10))


def test_params_hash_tracks_every_bit_of_the_parameters():
    model, _ = build_model("unet-digits-16")
    same, _ = build_model("unet-digits-16")
    assert params_hash(model) == params_hash(same) and len(params_hash(model)) == 32
    with torch.no_grad():
        next(same.parameters()).view(-1)[0] += 1e-7
    assert params_hash(model) != params_hash(same)


def test_merkle_proofs_round_trip_and_detect_tampering(setup):
    model, scheduler, source, sketch = setup
    records = []
    for index in range(5):
        model.zero_grad(set_to_none=True)
        records.append(compute_micro_batch(model, scheduler, source.get(range(index, index + 2)), index,
                                           prediction_type="epsilon", sketch=sketch, index=index))
    root = merkle_root(records)
    assert root == merkle_root([record_bytes(r) for r in records]) and len(root) == 32
    for i, record in enumerate(records):
        proof = merkle_proof(records, i)
        assert verify_proof(root, record, proof) and verify_proof(root, record_bytes(record), proof)
    tampered = dataclasses.replace(records[2], loss=records[2].loss * (1 + 1e-12))
    assert not verify_proof(root, tampered, merkle_proof(records, 2))
    assert merkle_root(records[:2] + [tampered] + records[3:]) != root
    proof = merkle_proof(records, 2)
    forged = MerkleProof(proof.index, proof.size, ((proof.siblings[0][0], b"\0" * 32),) + proof.siblings[1:])
    assert not verify_proof(root, records[2], forged)
    moved = MerkleProof(3, proof.size, proof.siblings)  # the same path claimed for another position
    assert not verify_proof(root, records[2], moved)
    assert merkle_root(list(reversed(records))) != root


def test_recompute_and_compare_catch_a_wrong_record(setup):
    model, scheduler, source, sketch = setup
    indices, seed = list(range(16, 16 + MICRO_BATCH)), micro_batch_seed(0, "digits", 4, "node-a", 7)
    model.zero_grad(set_to_none=True)
    claimed = compute_micro_batch(model, scheduler, source.get(indices), seed, prediction_type="epsilon",
                                  sketch=sketch, index=7)
    recomputed = recompute(model, scheduler, source, indices, seed, "epsilon", sketch, index=7)
    assert all(p.grad is None for p in model.parameters())
    check = compare(claimed, recomputed, Tolerances())
    assert check.passed and (check.loss_diff, check.norm_diff, check.sketch_diff) == (0.0, 0.0, 0.0)
    assert check.to_proto().passed
    lazy = dataclasses.replace(claimed, sketch=claimed.sketch * 1.01)
    assert not compare(lazy, recomputed, Tolerances()).passed
    assert compare(lazy, recomputed, Tolerances()).sketch_diff == pytest.approx(0.01, rel=1e-3)
    fewer = dataclasses.replace(claimed, samples=claimed.samples - 1)
    assert not compare(fewer, recomputed, Tolerances()).passed
    wrong_size = dataclasses.replace(claimed, sketch=claimed.sketch[:10])
    assert compare(wrong_size, recomputed, Tolerances()).sketch_diff == float("inf")


CHILD = """
import sys, torch
torch.set_num_threads(1)
from omi.models import GradientSketch, build_model, compute_micro_batch, open_source, params_hash, record_bytes
from omi.protos import pb

model, scheduler = build_model("unet-digits-16")
source = open_source(pb.DataSpec(source="builtin:digits", shard_size=64, resolution=16))
record = compute_micro_batch(model, scheduler, source.get(range(8)), 42, prediction_type="epsilon",
                             sketch=GradientSketch(model, 512, 3))
sys.stdout.write(params_hash(model).hex() + " " + record_bytes(record).hex())
"""


def test_another_process_with_the_same_thread_count_recomputes_bitwise():
    outputs = [subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True,
                              timeout=120).stdout for _ in range(2)]
    assert outputs[0] == outputs[1] and len(outputs[0]) > 1000
