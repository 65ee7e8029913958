"""Micro-batch records on the wire, computed the same way by the node, the coordinator and the validator.

A node commits to its records (Merkle root), sends the sketch of the gradient it handed to the averaging, and
hands the records over when audited; the coordinator checks them against the signed contribution; a validator
checks the chosen ones' Merkle proofs and recomputes them. Each side converting or combining records by its own
code would let the two drift apart, so all of them use this module.

>>> records = [MicroBatchRecord(i, 32, 0.5, 1.0, torch.ones(4)) for i in range(3)]
>>> back = record_from_proto(record_to_proto(records[1]))
>>> back.index, back.samples, back.loss, back.sketch.tolist()
(1, 32, 0.5, [1.0, 1.0, 1.0, 1.0])
>>> sent_sketch(records)
tensor([1., 1., 1., 1.])
>>> audited = audited_record(records, 2)
>>> verify_proof(merkle_root(records), record_from_proto(audited.record), proof_of(audited))
True
"""

from __future__ import annotations

import torch
from omi.models.commitment import MerkleProof, merkle_proof, merkle_root, verify_proof  # noqa: F401 (doctest)
from omi.models.microbatch import MicroBatchRecord
from omi.protos import pb


def record_to_proto(record: MicroBatchRecord) -> pb.MicroBatchRecord:
    return pb.MicroBatchRecord(index=record.index, samples=record.samples, loss=record.loss,
                               grad_norm=record.grad_norm, sketch=record.sketch.tolist())


def record_from_proto(record: pb.MicroBatchRecord) -> MicroBatchRecord:
    return MicroBatchRecord(index=record.index, samples=record.samples, loss=record.loss, grad_norm=record.grad_norm,
                            sketch=torch.tensor(list(record.sketch), dtype=torch.float32))


def audited_record(records: list[MicroBatchRecord], index: int) -> pb.AuditedRecord:
    """Record ``index`` with its Merkle proof under ``merkle_root(records)``, as a validator receives it."""
    proof = merkle_proof(records, index)
    return pb.AuditedRecord(record=record_to_proto(records[index]), proof_hashes=[h for _, h in proof.siblings],
                            proof_sides="".join(side for side, _ in proof.siblings), leaves=proof.size)


def proof_of(audited: pb.AuditedRecord) -> MerkleProof:
    """The Merkle proof an :func:`audited_record` carries."""
    return MerkleProof(index=audited.record.index, size=audited.leaves,
                       siblings=tuple(zip(audited.proof_sides, audited.proof_hashes, strict=False)))


def sent_sketch(records: list[MicroBatchRecord]) -> torch.Tensor:
    """Sketch of the gradient hivemind's ``GradientAverager`` sends for these micro-batches.

    It accumulates ``samples_i / samples_0 * grad_i`` and divides by the number of micro-batches; the sketch is
    linear, so the same combination of the micro-batch sketches is the sketch of what was sent.
    """
    anchor = records[0].samples
    total = sum(record.sketch * (record.samples / anchor) for record in records)
    return total / len(records)
