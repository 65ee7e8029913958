"""The coordinator's records check: an audited node's handed-over records against its signed contribution.

Nothing is recomputed (that is a validator's replay of a segment): the records' Merkle root must be the
contribution's commitment, their count its ``micro_batches``, their samples add up to its ``samples``, their losses
to its ``mean_loss``, and their sketches' sample-weighted combination must be the ``gradient_sketch`` the node said
it sent into the averaging. The auditor (:mod:`omi.coordinator.audit`) fails the audit on any mismatch and otherwise
keeps the chosen records with their Merkle proofs (:func:`audited_records`) for the validator.
"""

import math

import torch
from omi.models import MicroBatchRecord, audited_record, merkle_root, sent_sketch
from omi.protos import pb

SKETCH_SUM_TOLERANCE = 1e-5  # relative; the node and the coordinator compute the same float32 sum


def check_records(contribution: pb.Contribution, records: list[MicroBatchRecord], sketch_size: int) -> str:
    """Why the handed-over records contradict the signed contribution ("" if they do not); no recomputation.

    >>> import torch
    >>> records = [MicroBatchRecord(i, 32, 0.5, 1.0, torch.ones(4)) for i in range(3)]
    >>> c = pb.Contribution(samples=96, micro_batches=3, mean_loss=0.5, commitment=merkle_root(records),
    ...                     gradient_sketch=[1.0] * 4)
    >>> check_records(c, records, 4)
    ''
    >>> check_records(c, records[:2], 4)
    'contribution claims 3 micro-batches, 2 records handed over'
    """
    if len(records) != contribution.micro_batches:
        return f"contribution claims {contribution.micro_batches} micro-batches, {len(records)} records handed over"
    if [r.index for r in records] != list(range(len(records))):
        return "records are not micro-batches 0..n-1 in order"
    if any(r.sketch.numel() != sketch_size for r in records):
        return f"a record's sketch does not have verification.sketch_size = {sketch_size} numbers"
    if merkle_root(records) != contribution.commitment:
        return "records do not match the commitment (Merkle root differs)"
    sizes = {r.samples for r in records}
    if len(sizes) != 1 or 0 in sizes:
        return f"micro-batches of different or zero sizes: {sorted(sizes)}"
    samples = sum(r.samples for r in records)
    if samples != contribution.samples:
        return f"contribution claims {contribution.samples} samples, records hold {samples}"
    mean_loss = sum(r.loss * r.samples for r in records) / samples
    if not math.isclose(mean_loss, contribution.mean_loss, rel_tol=1e-9, abs_tol=1e-12):
        return f"mean_loss {contribution.mean_loss:.6g} is not the records' {mean_loss:.6g}"
    expected = sent_sketch(records)
    claimed = torch.tensor(list(contribution.gradient_sketch), dtype=torch.float32)
    if claimed.shape != expected.shape:
        return "gradient_sketch has the wrong length"
    difference = float((claimed - expected).norm() / expected.norm().clamp_min(1e-12))
    if not difference <= SKETCH_SUM_TOLERANCE:
        return f"gradient_sketch is not the records' sample-weighted sum (relative difference {difference:.2e})"
    return ""


def audited_records(records: list[MicroBatchRecord], indices: list[int]) -> list[pb.AuditedRecord]:
    """The chosen records with their Merkle proofs, as a validator receives them."""
    return [audited_record(records, i) for i in indices]
